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
    total = t.steps or max(1, math.ceil(t.epochs * steps_per_epoch))
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


NON_FINITE = (
    "the loss was NaN",
    "the loss was inf",
    "the gradient norm was NaN",
    "the gradient norm was inf",
)
"""What each of `Window.flags` says, in order."""


def non_finite(flags: list[float], *more: str) -> str:
    """`Window.flags` (summed over processes, read on the host) and `more` such clauses in
    words, e.g. "the loss was inf and the gradient norm was NaN"; "" when all is finite."""
    clauses = [words for words, flag in zip(NON_FINITE, flags, strict=True) if flag]
    *head, last = [*clauses, *more] or [""]
    return f"{', '.join(head)} and {last}" if head else last


@dataclass
class Window:
    """What happened since the last log step: the summed loss and whether a gradient norm was NaN
    or inf stay device tensors (no host sync per step); images and steps are counted on the
    host. A non-finite loss stays in the sum, so `flags` covers both. The loss of the run's first
    optimizer step is kept on the device too (with `keep_first`), for the first log step."""

    loss: torch.Tensor
    images: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)
    keep_first: bool = False
    """Whether the next optimizer step is the run's first (a fresh run): `step` keeps its loss."""
    first: torch.Tensor | None = None
    """This process's loss of the run's first optimizer step, until the first log step reads it
    (and sets it back to None)."""
    bad_norms: torch.Tensor = field(init=False)
    """(a gradient norm was NaN, one was inf), bool."""

    def __post_init__(self) -> None:
        self.bad_norms = torch.zeros(2, dtype=torch.bool, device=self.loss.device)

    def add(self, loss: torch.Tensor, window: int, images: int) -> None:
        """One micro-batch's detached loss, weighted as its share of its accumulation window."""
        self.loss += loss / window
        self.images += images

    def step(self, grad_norm: torch.Tensor) -> None:
        """An optimizer step whose gradients had norm `grad_norm` (a device tensor)."""
        if self.keep_first:  # the window holds the first step's loss alone
            self.first, self.keep_first = self.loss.clone(), False
        self.bad_norms |= torch.stack((grad_norm.isnan(), grad_norm.isinf()))
        self.steps += 1

    def flags(self) -> torch.Tensor:
        """(loss NaN, loss inf, a gradient norm NaN, one inf) of the window as a float device
        tensor of 4, summed over processes where the host reads anyway (log and save steps);
        `non_finite` puts it in words."""
        loss = torch.stack((self.loss.isnan(), self.loss.isinf()))
        return torch.cat((loss, self.bad_norms)).float()

    def elapsed(self) -> float:
        """Seconds since the window started."""
        return time.perf_counter() - self.start

    def reset(self) -> None:
        """A new window; its flags are read first (log_step)."""
        self.loss.zero_()
        self.bad_norms.fill_(False)
        self.images, self.steps, self.start = 0, 0, time.perf_counter()
