"""Where a run is (saved in every checkpoint) and its fixed batch and schedule arithmetic."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ssl_vit.config import Config, ConfigError


class RunError(RuntimeError):
    """The run cannot go on (it diverged, the disk is full, a loader worker is stuck); the
    message says why and which checkpoint resumes."""


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint (train_state.json) so resume continues
    mid-epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch_in_epoch = d["step"], d["epoch"], d["batch_in_epoch"]


@dataclass
class Plan:
    """Batch arithmetic and schedule lengths, fixed before the first step."""

    accum: int
    effective_batch: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    stop_step: int
    warmup_steps: float
    peak_lr: float

    def window(self, i: int) -> int:
        """Micro-batches in the accumulation window of batch i of an epoch: accum, or what is
        left of the epoch in its last, shorter window (so every window's gradient is a mean)."""
        full_windows_end = (self.batches_per_epoch // self.accum) * self.accum
        return self.accum if i < full_windows_end else self.batches_per_epoch - full_windows_end

    def boundary(self, i: int) -> bool:
        """Whether batch i of an epoch ends its window: the optimizer steps after it."""
        return (i + 1) % self.accum == 0 or i + 1 == self.batches_per_epoch


def make_plan(cfg: Config, num_processes: int, batches_per_epoch: int) -> Plan:
    t = cfg.train
    per_step = t.batch_size * num_processes
    accum = math.ceil(t.effective_batch / per_step) if t.effective_batch else t.accum_steps
    effective = per_step * accum
    if batches_per_epoch == 0:
        raise ConfigError(
            [
                f"train.batch_size: one batch needs {per_step} images over "
                f"{num_processes} process(es), more than the dataset holds"
            ]
        )
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total = max(1, math.ceil(t.epochs * steps_per_epoch))
    return Plan(
        accum=accum,
        effective_batch=effective,
        batches_per_epoch=batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        stop_step=min(total, t.max_steps) if t.max_steps else total,
        warmup_steps=t.warmup_epochs * steps_per_epoch,
        peak_lr=t.lr or t.base_lr * effective / t.lr_batch_divisor,
    )


@dataclass
class Window:
    """What happened since the last log step: the summed loss and the finiteness of every
    gradient norm stay device tensors (no host sync per step); images and steps are counted on
    the host. A non-finite loss stays in the sum, so `diverged` covers both."""

    loss: torch.Tensor
    images: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)
    norms_finite: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.norms_finite = torch.ones((), dtype=torch.bool, device=self.loss.device)

    def add(self, loss: torch.Tensor, window: int, images: int) -> None:
        """One micro-batch's detached loss, weighted as its share of its accumulation window."""
        self.loss += loss / window
        self.images += images

    def step(self, grad_norm: torch.Tensor) -> None:
        """An optimizer step whose gradients had norm `grad_norm` (a device tensor)."""
        self.norms_finite &= torch.isfinite(grad_norm)
        self.steps += 1

    def diverged(self) -> torch.Tensor:
        """1.0 when a loss or gradient norm of the window was not finite, else 0.0 (a device
        tensor: read it where the host reads anyway, at log and save steps)."""
        return (~(torch.isfinite(self.loss) & self.norms_finite)).float()

    def elapsed(self) -> float:
        """Seconds since the window started."""
        return time.perf_counter() - self.start

    def reset(self) -> None:
        """A new window; the divergence flag is read first (log_step)."""
        self.loss.zero_()
        self.norms_finite.fill_(True)
        self.images, self.steps, self.start = 0, 0, time.perf_counter()
