"""The run directory (DESIGN.md § Run directory): checked before a run starts, its log and
metrics while it runs, its exported weights at the end."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.distributed.tensor import DTensor

from ssl_vit.config import Config, ConfigError
from ssl_vit.methods.protocol import Method
from ssl_vit.weights import (
    BACKBONE_CONFIG,
    BACKBONE_WEIGHTS,
    CHECKPOINTS,
    export_timm,
    latest_checkpoint,
)

RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "train.log",
    BACKBONE_WEIGHTS,
    BACKBONE_CONFIG,
    "classifier.safetensors",
    "classifier.json",
    "classifier_best.safetensors",
    "classifier_best.json",
)
RUN_DIRS = (CHECKPOINTS, "tb")


def prepare_run_dir(cfg: Config, is_main: bool) -> Path | None:
    """Check the output directory and return the checkpoint to resume from (None = fresh start).

    A directory holding anything is only reused with train.resume or train.overwrite, so a
    forgotten `--train.output_dir` never mixes or destroys two runs.
    """
    run_dir = Path(cfg.train.output_dir)
    t = cfg.train
    if t.resume == "auto":
        return latest_checkpoint(run_dir)
    if t.resume:
        return Path(t.resume)
    # config.json and train.log alone are what a start that failed before training leaves
    started = run_dir.is_dir() and any(
        p.name not in ("config.json", "train.log") for p in run_dir.iterdir()
    )
    if started:
        if not t.overwrite:
            raise ConfigError(
                [
                    f"train.output_dir: {run_dir} already holds another run; pass --train.resume "
                    "auto to continue it, --train.overwrite true to replace it, or another "
                    "output_dir"
                ]
            )
        if is_main:
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
            for name in RUN_DIRS:
                shutil.rmtree(run_dir / name, ignore_errors=True)
    return None


@contextlib.contextmanager
def run_log(run_dir: Path, main: bool) -> Iterator[None]:
    """On the main process, log INFO to the console and to run_dir/train.log for this run."""
    if not main:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handlers = [logging.StreamHandler(), logging.FileHandler(run_dir / "train.log")]
    level = root.level
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    quiet = logging.getLogger("accelerate")  # per-file save messages would drown the run's own
    quiet_level = quiet.level
    quiet.setLevel(logging.WARNING)
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
        quiet.setLevel(quiet_level)


class Metrics:
    """metrics.jsonl (main process) and the trackers (TensorBoard), one row per call."""

    def __init__(self, accelerator: Any, run_dir: Path):
        self.accelerator, self.path = accelerator, run_dir / "metrics.jsonl"
        self.main = accelerator.is_main_process

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.accelerator.log(metrics, step=step)
        self.write(metrics)

    def write(self, row: dict[str, Any]) -> None:
        """A row in metrics.jsonl only (the final result)."""
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def as_best(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The summary of the best evaluation: best_val_top1, best_val_top5, best_val_head (the lr
    grid's head, for a linear probe), best_step and best_epoch."""
    keys = ("val_top1", "val_top5", "val_head", "step", "epoch")
    return {f"best_{k}": evaluation[k] for k in keys if k in evaluation}


def best_evaluation(run_dir: Path) -> dict[str, Any]:
    """The best top-1 evaluation logged so far in run_dir/metrics.jsonl, so that a resumed run
    keeps comparing against it; {} when there is none."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    evals = [r for r in rows if "val_top1" in r]
    return as_best(max(evals, key=lambda r: r["val_top1"])) if evals else {}


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of an FSDP-sharded parameter (a DTensor); any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def export_weights(method: Method, run_dir: Path, main: bool, stem: str = "backbone") -> None:
    """Write the exported backbone (stem "backbone") or the method's timm classifier, if it has
    one (any other stem). Called on every process: under FSDP each gathers the shards (a
    collective); the main process writes."""
    if stem == "backbone":
        backbone = method.export_backbone()
        state, spec = backbone.state_dict(), backbone.config_dict()
        name, kwargs = spec["name"], spec["kwargs"]
    elif (classifier := method.export_classifier()) is not None:
        state, name, kwargs = classifier
    else:
        return
    state = {k: full_tensor(v) for k, v in state.items()}
    if main:
        export_timm(state, name, kwargs, run_dir, stem)
