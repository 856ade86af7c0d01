"""One training step: what the loop runs for every batch, and what the benchmark times.

An optimizer step is a window of micro-batches (gradient accumulation): `forward_backward` on
each (autocast, the method's training_step, backward of its share of the window's mean loss,
gradients synchronised across processes only on the last one), then `optimizer_step` (the lr and
weight-decay schedules, the method's hooks around the update, clipping, the optimizer, zeroing).
Nothing here reads a tensor on the host: the gradient norm stays a device tensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ssl_vit.config import TrainConfig
from ssl_vit.methods.protocol import Method
from ssl_vit.optim import build_optimizer, warmup_cosine
from ssl_vit.train.state import Plan

KEEP_FREED_BYTES = 1 << 30
"""Blocks under this size come from the allocator's heap, and this much free memory at its top
stays there (glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD)."""


def keep_freed_memory() -> bool:
    """Let a CPU training process keep the memory a step frees for the next step (glibc only;
    True when set). By default glibc hands back to the system every freed block over its mmap
    threshold (which adapts up to 32 MiB only: a DINO head's 64 MiB weight, its gradient) and the
    heap's free top beyond twice it, so each step faults the same pages in again: 360k minor
    faults a DINO ViT-S/16 step on 2 cores, against 20-40k kept (docs/performance.md). The
    process keeps its peak memory, which every step reaches anyway."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    ok = mallopt(m_mmap_threshold, KEEP_FREED_BYTES) and mallopt(m_trim_threshold, KEEP_FREED_BYTES)
    return bool(ok)


def compile_step(model: nn.Module, backend: str = "inductor") -> Any:
    """torch.compile of the (prepared) method, whose forward is the whole training step: masking,
    encoder, decoder or heads, loss. Static shapes (dynamic=False): the batch size and every crop
    resolution are fixed, so one graph compiles once, with no dynamic-shape recompile."""
    return torch.compile(model, backend=backend, dynamic=False)


def grad_norm(params: list[nn.Parameter]) -> Tensor:
    """The global gradient norm, as a device tensor (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_per_param_(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """DINO's clipping: scale each parameter's gradient to norm <= max_norm on its own, on the
    device without a host sync. Returns the global norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms])
    return torch.linalg.vector_norm(torch.stack(norms))


def optimizer_for(method: Method, t: TrainConfig, betas: tuple[float, float]) -> Any:
    """train.optimizer over the method's param groups, each group's `wd_scale` set (the
    weight-decay schedule scales each group's own value) unless the method gave it."""
    groups = method.param_groups(t.weight_decay)
    for g in groups:
        g.setdefault("wd_scale", g["weight_decay"] / t.weight_decay if t.weight_decay else 0.0)
    return build_optimizer(groups, t.optimizer, betas=betas, momentum=t.momentum)


def schedule(t: TrainConfig, plan: Plan, step: int, method: Method) -> tuple[float, float]:
    """(lr, weight decay) of optimizer step `step`: the method's warmup then cosine to
    train.min_lr (`Method.lr_at`), per iteration; weight decay constant, or cosine to
    train.weight_decay_end (DINO)."""
    lr = method.lr_at(step, plan.total_steps, plan.warmup_steps, plan.peak_lr, t.min_lr)
    wd = t.weight_decay
    if t.weight_decay_end is not None:
        wd = warmup_cosine(step, plan.total_steps, 0, wd, t.weight_decay_end)
    return lr, wd


@dataclass
class Stepper:
    """What a training step works on, fixed for the run."""

    accelerator: Any
    """Accelerate's: autocast, backward (loss scaling, DDP / FSDP), gradient sync and clipping."""
    model: nn.Module
    """The method as `accelerator.prepare` returned it (DDP- or FSDP-wrapped)."""
    method: Method
    """The same method unwrapped, whose hooks the step calls."""
    optimizer: Any
    train: TrainConfig
    plan: Plan
    forward: Callable[[dict[str, Any]], dict[str, Tensor]]
    """`model`, or its compiled version (train.compile)."""

    def __post_init__(self) -> None:
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]


def forward_backward(s: Stepper, batch: dict[str, Any], window: int, last: bool) -> dict:
    """One micro-batch of a window of `window`: forward under autocast, backward of loss / window;
    gradients are synchronised across processes only when it is the `last` of its window."""
    sync = contextlib.nullcontext() if last else s.accelerator.no_sync(s.model)
    with sync:
        with s.accelerator.autocast():
            out = s.forward(batch)
        s.accelerator.backward(out["loss"] / window)
    return out


def optimizer_step(s: Stepper, step: int) -> dict[str, Any]:
    """Optimizer step `step` (0-based) on the accumulated gradients. Returns lr, weight_decay and
    grad_norm: a device tensor, every step (the loop's divergence check), never read here."""
    t = s.train
    lr, wd = schedule(t, s.plan, step, s.method)
    for g in s.optimizer.param_groups:
        g["lr"] = s.method.group_lr(g, lr, step, s.plan.total_steps, s.plan.peak_lr, t.min_lr)
        g["weight_decay"] = wd * g["wd_scale"]
    s.method.before_optimizer_step(step)
    if t.clip_grad and t.clip_mode == "param":
        s.accelerator.unscale_gradients()
        norm = clip_per_param_(s.trainable, t.clip_grad)
    elif t.clip_grad:
        norm = s.accelerator.clip_grad_norm_(s.trainable, t.clip_grad)
    else:
        norm = grad_norm(s.trainable)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.method.after_optimizer_step(step, s.plan.total_steps)
    return {"lr": lr, "weight_decay": wd, "grad_norm": norm}
