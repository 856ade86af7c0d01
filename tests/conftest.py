"""What the tests share: one tiny-config factory for runs of every method, and the helpers that
read a run back (metrics, saved weights) or run one in a subprocess."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig, flatten
from ssl_vit.data.segmentation import build_segmentation
from ssl_vit.eval.segmentation import confusion, scores
from ssl_vit.methods.deit import DeiTConfig
from ssl_vit.methods.dinov3 import GramConfig
from ssl_vit.registry import TRAINABLE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # `import bench`: the benchmark is a tools/ script

TINY_MODEL = dict(
    name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
)
"""A 2-block ViT of width 32 on 32 px images, 16 patches of 8 px: a step in milliseconds."""
TINY_DINO = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops=3, local_crop_size=16)
TINY_METHODS: dict[str, dict[str, Any]] = {
    "mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "dino": TINY_DINO,
    "dinov2": dict(TINY_DINO, warmup_teacher_temp_epochs=1),
    "dinov3": dict(
        TINY_DINO,
        warmup_teacher_temp_epochs=1,
        ibot_out_dim=64,
        ibot_hidden_dim=32,
        ibot_bottleneck_dim=16,
        gram=GramConfig(it_load_ema_teacher=1, it_first_update=1, update_frequency=2),
    ),
    "deit": dict(num_classes=10),
    "linprobe": dict(num_classes=10),
    "finetune": dict(deit=DeiTConfig(num_classes=10, repeated_aug=1)),
    "segprobe": dict(num_classes=11, warmup_iters=1),
    "segfinetune": dict(
        num_classes=11,
        num_queries=8,
        num_blocks=1,
        anneal_start=(2,),
        anneal_end=(8,),
        num_points=64,
        warmup_iters=(1, 1),
    ),
}
"""Each method's (and evaluator's) tiny settings: MAE's decoder; DINO's and DINOv2's head and 3
local 16 px crops (DINOv2, DINOv3: a 1-epoch temperature warmup; DINOv3: its iBOT head as small,
the Gram teacher taken at iteration 1, refreshed every 2, its loss from iteration 1); the classes
of DeiT and the evaluators (the synthetic dataset's 10; segmentation's 11, background and the 10
shapes). An evaluator's method.checkpoint is the caller's."""


@pytest.fixture(autouse=True)
def root_log_level():
    """Each test starts at logging's default root level (WARNING), whatever an earlier test or a
    library it ran left there (the suite once left ERROR: later tests saw no warning)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    yield
    root.setLevel(level)


def tiny(
    run_dir: Path,
    method: str | Any = "mae",
    *,
    model: dict[str, Any] | None = None,
    **train: Any,
) -> Config:
    """A tiny run of `method` (a registry name, tiny-sized; or a method config) in `run_dir` on 32
    synthetic images: 4 epochs of 4 steps of 8 images, logging every step, saving at the end
    only. `model` adds to TINY_MODEL, `train` overrides train fields."""
    if isinstance(method, str):
        method = TRAINABLE[method].config(**TINY_METHODS[method])
    t = dict(output_dir=str(run_dir), epochs=4, warmup_epochs=1, batch_size=8, base_lr=0.05)
    t |= dict(log_every=1, save_every_epochs=0)
    return Config(
        model=ModelConfig(**TINY_MODEL | (model or {})),
        data=DataConfig(synthetic_size=32, num_workers=0),
        train=TrainConfig(**t | train),
        method=method,
    )


def overrides(cfg: Config) -> list[str]:
    """The command-line form of a config: --method NAME, then every field (so a subprocess runs
    exactly `cfg`)."""
    args = ["--method", cfg.method.name]
    fields = {k: v for k, v in flatten(cfg.to_dict()).items() if k != "method.name"}
    for key, value in fields.items():
        value = ",".join(map(str, value)) if isinstance(value, list | tuple) else value
        args += [f"--{key}", str(value)]
    return args


def train_until_killed(cfg: Config, step: int) -> Path:
    """Run `cfg` in a subprocess, SIGKILL it once checkpoint `step` is complete; that checkpoint."""
    cmd = [sys.executable, "-m", "ssl_vit", "train", *overrides(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = Path(cfg.train.output_dir) / "checkpoints" / f"step_{step:07d}"
    deadline = time.time() + 240
    while not (ckpt / "complete").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    return ckpt


def params(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The model state of checkpoint `step` of a run."""
    return load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    """The logged training steps of a run (metrics.jsonl rows with a loss)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "loss" in m]


def synthetic_frequency_baseline() -> float:
    """mIoU (%) of predicting the most frequent training class everywhere on the held-out split
    of the built-in synthetic segmentation (200 images of 32 px, 11 classes): what a segmenter
    must beat to have learned anything."""

    def masks(split: str, n: int) -> torch.Tensor:
        data = build_segmentation(
            DataConfig(synthetic_size=200), lambda s: {"masks": s.mask}, split, image_size=32
        )
        return torch.stack([data[i]["masks"] for i in range(min(n, len(data)))]).long()

    frequent = int(torch.bincount(masks("train", 50).flatten(), minlength=11).argmax())
    val = masks("val", 100)
    return 100 * scores(confusion(torch.full_like(val, frequent), val, 11))["miou"]
