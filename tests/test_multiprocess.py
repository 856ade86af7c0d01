"""The guarantees users rely on when they train on several processes, tested where they are used:
under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU). A run stopped and resumed
through the trainer ends bit for bit where the uninterrupted run ends (MAE and DINO; an image
folder and a shard stream; with and without loader workers; DDP and FSDP's sharded checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import make_shards
import pytest
import torch
from conftest import ROOT, metrics, overrides, tiny
from safetensors.torch import load_file
from write_images import write_image_folder

STOP, STEPS = 5, 12
"""Runs of 3 epochs of 4 steps (32 images, 4 per process), stopped after step 5: mid-epoch."""


def launch(tmp_path: Path, runs: list[list[str]], fsdp: bool = False) -> str:
    """Run `runs` (`ssl-vit train` argument lists) one after the other in one 2-process launch;
    its stderr."""
    spec = tmp_path / f"runs_{len(list(tmp_path.glob('runs_*')))}.json"
    spec.write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if fsdp:  # FSDP2 over gloo: see launched_runs.fsdp_on_cpu
        cmd += ["--config_file", str(ROOT / "configs" / "fsdp.yaml")]
    else:  # --multi_gpu selects the torchrun launcher; without GPUs the processes use gloo
        cmd += ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    cmd += ["--num_processes", "2", "--main_process_port", "0", "--mixed_precision", "no"]
    cmd += [str(ROOT / "tests" / "launched_runs.py"), str(spec), *(["--fsdp"] if fsdp else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """32 JPEGs of 32 px in 4 class folders, and the same as 8 WebDataset shards of 4."""
    root = tmp_path_factory.mktemp("mp_data")
    for c in range(4):
        write_image_folder(root / "folder" / f"class_{c}", 8, 32)
    make_shards.main([str(root / "folder"), str(root / "shards"), "--max_count", "4"])
    return {"folder": root / "folder", "stream": root / "shards"}


def args(run: Path, method: str, source: Path, stream: bool, workers: int, **train) -> list[str]:
    cfg = tiny(run, method, batch_size=4, epochs=3, **train)
    cfg.data.path, cfg.data.streaming, cfg.data.num_workers = str(source), stream, workers
    if stream:
        cfg.data.shuffle_buffer = 6
    return overrides(cfg)


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors that are not bit-identical (or not in both)."""
    both = a.keys() & b.keys()
    return sorted((a.keys() ^ b.keys()) | {k for k in both if not a[k].equal(b[k])})


def final_state(run: Path) -> dict[str, torch.Tensor]:
    """The model and optimizer state of a DDP run's last checkpoint, flattened."""
    ckpt = run / "checkpoints" / f"step_{STEPS:07d}"
    state = {f"model.{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    for i, s in opt["state"].items():
        state |= {f"optimizer.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)}
    return state


CASES = {  # name: (method, data source, stream, loader workers)
    "mae_folder": ("mae", "folder", False, 0),
    "dino_folder_workers": ("dino", "folder", False, 2),
    "dino_stream": ("dino", "stream", True, 0),
}


def test_two_process_runs_resume_bit_identically(tmp_path, data):
    """Each case run straight and stopped cleanly after step 5 in one launch, then resumed with
    --train.resume auto in a second: its final model and optimizer state equal the straight
    run's bit for bit, and so do the losses it logged after the resume."""
    first, second = [], []
    for name, (method, source, stream, workers) in CASES.items():
        case = (method, data[source], stream, workers)
        first += [args(tmp_path / "straight" / name, *case)]
        first += [args(tmp_path / "resumed" / name, *case, max_steps=STOP)]
        second += [args(tmp_path / "resumed" / name, *case, resume="auto")]
    launch(tmp_path, first)
    err = launch(tmp_path, second)
    assert err.count(f"at step {STOP} (epoch 1, batch 1)") == len(CASES)  # resumed mid-epoch
    differ = {}
    for name in CASES:
        straight, resumed = tmp_path / "straight" / name, tmp_path / "resumed" / name
        a, b = metrics(straight), metrics(resumed)
        assert [r["step"] for r in b] == list(range(1, STEPS + 1)), name
        losses = sum(x["loss"] != y["loss"] for x, y in zip(a, b, strict=True))
        differ[name] = (len(differing(final_state(straight), final_state(resumed))), losses)
    assert differ == dict.fromkeys(CASES, (0, 0))  # (tensors, logged losses) that differ


def test_fsdp_sharded_checkpoint_resumes_bit_identically(tmp_path, data):
    """FSDP2: each process saves and reloads its own shard of the model and optimizer; the
    resumed run's exported backbone and losses equal the straight run's bit for bit."""
    run = lambda kind, **kw: args(tmp_path / kind, "mae", data["folder"], False, 0, **kw)  # noqa: E731
    launch(tmp_path, [run("straight"), run("resumed", max_steps=STOP)], fsdp=True)
    ckpt = tmp_path / "resumed" / "checkpoints" / f"step_{STOP:07d}"
    assert len(list((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2  # a shard each
    launch(tmp_path, [run("resumed", resume="auto")], fsdp=True)
    a = load_file(str(tmp_path / "straight" / "backbone" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "backbone" / "model.safetensors"))
    assert differing(a, b) == []
    assert [r["loss"] for r in metrics(tmp_path / "resumed")] == [
        r["loss"] for r in metrics(tmp_path / "straight")
    ]
