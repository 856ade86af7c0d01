"""Time a method's training step, with and without its data pipeline.

    python tools/bench.py --method mae --model.name vit_base_patch16_224 --bench.batch_size 64
    python tools/bench.py --method dino --bench.modes compute,e2e,loader --data.num_workers 8

A step is the trainer's own (`ssl_vit.train.step`: forward and backward under Accelerate's
autocast, the schedules, the method's hooks, clipping, the fused AdamW step over the method's
param groups). `--bench.modes` picks what is timed:

* compute: the step on synthetic tensors held on the device (no data loading, no host copies),
  and, with bench.baseline, a "supervised ViT" step of the same encoder for scale: all tokens,
  cls token -> linear head (1000 classes) -> cross-entropy, same optimizer;
* e2e: the same step fed by the real pipeline: the method's view and the trainer's DataLoader
  (`ssl_vit.data.build_loader`) over data.path with data.num_workers, then the host-to-device copy
  (with data.decode_on_device: file bytes, decoded and augmented on the device, as in training);
* loader: the DataLoader alone (no model), for the MAE, DINO and DeiT views: img/s and img/s per
  worker (with data.decode_on_device, the device's decoding and augmentation included).

Each step phase runs in its own freshly spawned process, so the peak memory of one never counts
against another: on GPU the peak allocated memory, on CPU the peak resident set of the process
(which includes ~0.3-0.5 GiB of Python and library code, and not the loader workers). Each phase
also reports its analytic training FLOPs per image (`ssl_vit.flops`), the achieved TFLOP/s and,
given a device peak, the MFU. A table goes to stderr and the metrics as one JSON line to stdout.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from ssl_vit import flops
from ssl_vit.backbone import Backbone
from ssl_vit.cli.runner import Args, choice, parse, run_command
from ssl_vit.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, validate
from ssl_vit.data import DataError, StreamLoader, build_dataset, build_loader, build_stream
from ssl_vit.data.device import DeviceView, batch_generator, encoded_dataset
from ssl_vit.methods.protocol import Method
from ssl_vit.registry import METHODS, TRAINABLE
from ssl_vit.train.state import Plan
from ssl_vit.train.step import (
    Stepper,
    compile_step,
    forward_backward,
    keep_freed_memory,
    optimizer_for,
    optimizer_step,
)

NUM_CLASSES = flops.FULL_TOKEN_CLASSES
"""Classes of the full-token baseline's head (ImageNet-1k, as the supervised ViT it stands for)."""
LR = 1e-4
"""Learning rate of the timed steps; its value does not change the cost (non-zero: weights move)."""
PHASE_METRICS = (
    "step_time_s",
    "step_time_mean_s",
    "img_per_s",
    "ms_per_img",
    "tflops",
    "mfu",
    "peak_mem_mib",
    "minor_faults",
    "loss",
)
"""What each phase reports (PhaseResult.metrics); tflops is achieved TFLOP/s at the median,
minor_faults the median minor page faults of a timed step (memory the allocator handed back to
the system and touched again: a cost on CPU that the official steps may not pay)."""
LOADER_METRICS = ("img_per_s", "img_per_s_per_worker", "batch_time_s")
"""What the loader mode reports per view, as `loader_<view>_<metric>`."""
Mode = Literal["compute", "e2e", "loader"]
ViewName = Literal["mae", "dino", "deit"]


@dataclass
class BenchConfig:
    batch_size: int = 64
    """Images per step."""
    steps: int = 10
    """Timed steps per phase (median and mean are reported)."""
    warmup: int = 3
    """Untimed steps before timing (allocator, kernel selection, lazy init, torch.compile)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    modes: tuple[Mode, ...] = ("compute",)
    """What to time, comma-separated: compute = the step on synthetic tensors already on the
    device; e2e = the same step fed by the real pipeline (the method's view, the trainer's
    DataLoader over data.path with data.num_workers, the copy to the device); loader = the
    DataLoader alone for each of bench.loader_views."""
    baseline: bool = True
    """With the compute mode, also time the full-token supervised step of the same encoder and
    report the ratio."""
    loader_views: tuple[ViewName, ...] = ("mae", "dino", "deit")
    """Views the loader mode times: mae (crop, flip), dino (multi-crop), deit (RandAugment,
    random erasing). The benched method's view takes its --method.* fields; the others their
    defaults."""
    loader_batches: int = 40
    """Batches timed per view by the loader mode, after max(bench.warmup, data.num_workers)
    untimed ones that start every worker; keep it well above data.num_workers."""
    peak_tflops: float = 0.0
    """Device peak TFLOP/s for MFU; 0 = the GPU's dense peak at the run's precision from
    ssl_vit/flops.py's table (a CPU or an unknown GPU has none: MFU is then null)."""
    output: str = ""
    """Also write the final metrics as JSON to this file ('' = stdout only)."""


@dataclass
class BenchTrainConfig:
    compile: bool = False
    """Compile the step's module with torch.compile, as train.compile does (compilation falls in
    the warmup steps)."""
    compile_backend: str = "inductor"
    """torch.compile backend of train.compile, as in training (aot_eager / eager compile in
    seconds: for rehearsals on a CPU)."""
    clip_grad: float = 0.0
    """Clip gradients to this norm, as train.clip_grad (DINO's recipes clip at 3); 0 = none."""
    clip_mode: Literal["global", "param"] = "global"
    """global: the norm of all gradients together; param: each parameter's own (DINO's)."""


@dataclass
class BenchRoot:
    """What `ssl-vit bench` runs: the encoder, the data, the method (picked by --method) and the
    timing."""

    bench: BenchConfig = field(default_factory=BenchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: BenchTrainConfig = field(default_factory=BenchTrainConfig)
    method: Any = None
    """The method's own config dataclass; its class attribute `name` picks the method."""


def run_config(root: BenchRoot, method: Any = None) -> Config:
    """The training Config the bench stands for (views, samplers and validation read it)."""
    t = root.train
    train = TrainConfig(
        batch_size=root.bench.batch_size,
        compile=t.compile,
        compile_backend=t.compile_backend,
        clip_grad=t.clip_grad,
        clip_mode=t.clip_mode,
    )
    return Config(model=root.model, data=root.data, train=train, method=method or root.method)


# ---------------------------------------------------------------------------------------------
# Phases: each builds a module with training_step(batch) -> {"loss"} from the bench config.


class FullTokenClassifier(nn.Module, Method):
    """Supervised ViT of the same encoder: all patch tokens, cls token -> linear head -> CE."""

    def __init__(self, backbone: Backbone, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["images"] (B, C, H, W), batch["labels"] (B,) long."""
        out = self.backbone(batch["images"])
        feats = out.tokens[:, 0] if out.num_prefix else out.tokens.mean(dim=1)
        return {"loss": F.cross_entropy(self.head(feats), batch["labels"])}

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.training_step(batch)


def build_backbone(root: BenchRoot) -> Backbone:
    """As the trainer builds it, with model.grad_checkpointing when set (its recompute is not
    counted in the FLOPs: MFU counts model FLOPs)."""
    backbone = Backbone(root.model.name, **root.model.timm_kwargs())
    if getattr(root.model, "grad_checkpointing", False):
        backbone.set_grad_checkpointing(True)
    return backbone


def build_method(root: BenchRoot) -> nn.Module:
    """The method as the trainer builds it. A distilling DeiT without teacher_weights gets a
    randomly initialised timm `method.teacher`: its weights do not change the cost."""
    cfg, extra = root.method, {}
    if cfg.name == "deit" and cfg.distillation != "none" and not cfg.teacher_weights:
        extra["teacher"] = timm.create_model(cfg.teacher, num_classes=cfg.num_classes)
    return TRAINABLE[cfg.name].build(build_backbone(root), cfg, **extra)


def build_full_token(root: BenchRoot) -> nn.Module:
    return FullTokenClassifier(build_backbone(root))


def vit_dims(module: nn.Module) -> flops.ViTDims | None:
    """The dims of the module's backbone; None for a ViT with non-standard blocks (uncounted)."""
    try:
        return flops.ViTDims.of(module.backbone)
    except ValueError:
        return None


def method_flops(root: BenchRoot, module: nn.Module) -> flops.StepFlops | None:
    """Analytic step FLOPs of the method (None for the evaluators); a DeiT teacher's forward
    counted by FlopCounterMode on one image (a CNN, or any classifier: no analytic count here)."""
    dims = vit_dims(module) if root.method.name in {*flops.METHOD_FLOPS, *PROBES} else None
    if dims is None:
        return None
    if root.method.name == "segprobe":  # its 1x1 conv: a linear map of each patch's features
        head = module.conv
        return flops.probe_flops(dims, root.model.img_size, head.in_channels, head.out_channels)
    teacher, teacher_flops = getattr(module, "teacher", None), 0
    if root.method.name == "deit" and teacher is not None:
        size = root.method.teacher_img_size or root.model.img_size
        teacher_flops = flops.counted_forward_flops(teacher, (1, dims.in_chans, size, size))
    b = root.bench.batch_size
    return flops.step_flops(dims, root.model.img_size, root.method, teacher_flops, b)


def full_token_flops(root: BenchRoot, module: nn.Module) -> flops.StepFlops | None:
    dims = vit_dims(module)
    return None if dims is None else flops.full_token_flops(dims, root.model.img_size)


class Phase(NamedTuple):
    build: Callable[[BenchRoot], nn.Module]
    """Builds the module whose training_step is timed."""
    count: Callable[[BenchRoot, nn.Module], flops.StepFlops | None]
    """Its training FLOPs per image."""
    feed: Literal["synthetic", "loader"]
    """synthetic: one batch of device tensors, reused; loader: the real pipeline, per step."""


PHASES: dict[str, Phase] = {
    "method": Phase(build_method, method_flops, "synthetic"),
    "e2e": Phase(build_method, method_flops, "loader"),
    "full_token": Phase(build_full_token, full_token_flops, "synthetic"),
}
"""Phase name -> how to build, count and feed it. The method's compute phase reports its metrics
unprefixed, the others under `<phase>_`."""


@dataclass
class PhaseResult:
    step_times_s: list[float]
    """Wall time of each timed step, device-synchronised."""
    loss: float
    """Loss of the last timed step (finite when the step computed something sensible)."""
    peak_mem_mib: float | None
    """Peak device memory allocated (CUDA) or peak process RSS (CPU); None where unmeasurable."""
    device_name: str
    """The GPU's name, or the CPU's."""
    threads: int
    """Torch intra-op CPU threads of the phase's process."""
    step_flops: flops.StepFlops | None = None
    """Analytic FLOPs per image of the step (None where the method has no count)."""
    step_faults: list[int] = field(default_factory=list)
    """Minor page faults of the process during each timed step."""

    def metrics(self, batch_size: int, peak_tflops: float | None = None) -> dict[str, Any]:
        """PHASE_METRICS: median, mean step time; img/s, ms/img, TFLOP/s, MFU at the median;
        memory; loss."""
        median = statistics.median(self.step_times_s)
        img_per_s = batch_size / median
        count = None if self.step_flops is None else self.step_flops.train
        values = (
            median,
            statistics.fmean(self.step_times_s),
            img_per_s,
            1e3 * median / batch_size,
            None if count is None else flops.achieved_tflops(count, img_per_s),
            None if count is None else flops.mfu(count, img_per_s, peak_tflops),
            self.peak_mem_mib,
            statistics.median(self.step_faults) if self.step_faults else None,
            self.loss,
        )
        return dict(zip(PHASE_METRICS, values, strict=True))


def synthetic_batch(root: BenchRoot, device: torch.device, in_chans: int) -> dict[str, Any]:
    """Standard-normal pixels on `device` in the structure the method's view gives one image
    ({"images"} for MAE, {"crops": [...]} for DINO), each tensor batched to bench.batch_size; plus
    "images" (B, C, img_size, img_size) for the full-token phase and "labels" in [0, K), K the
    fewer of NUM_CLASSES and the method's num_classes (DeiT's one-hot targets need label < K).
    """
    b, s = root.bench.batch_size, root.model.img_size
    classes = min(NUM_CLASSES, getattr(root.method, "num_classes", NUM_CLASSES))
    if root.method.name in PROBES:  # image + mask pairs: per-pixel labels
        images = torch.randn(b, in_chans, s, s, device=device)
        return {"images": images, "masks": torch.randint(0, classes, (b, s, s), device=device)}
    view = METHODS[root.method.name].view(run_config(root))
    item = view(torch.zeros(in_chans, s, s, dtype=torch.uint8))

    def batched(x: Any) -> Any:
        if isinstance(x, list):
            return [batched(t) for t in x]
        return torch.randn(b, *x.shape, device=device)

    return {
        "images": torch.randn(b, in_chans, s, s, device=device),
        **{key: batched(value) for key, value in item.items()},
        "labels": torch.randint(0, classes, (b,), device=device),
    }


def real_loader(
    root: BenchRoot, method: Any, batches: int, pin_memory: bool = True
) -> torch.utils.data.DataLoader:
    """The trainer's DataLoader (data.num_workers workers, `collate`) over data.path through the
    view of `method` (a method config), for one process, holding exactly `batches` batches.

    Its order is the method's epoch order (shuffled, or e.g. repeated augmentation) repeated over
    epochs as needed, cut to `batches` x bench.batch_size. So the loader ends right after the last
    batch the bench takes: no worker restart between epochs inside a timed window, and no worker
    stopped in the middle of a batch at the end.
    """
    cfg = run_config(root, method)
    b, spec = root.bench.batch_size, METHODS[method.name]
    if cfg.data.streaming:  # the trainer's stream of one process, epochs after epochs
        stream = build_stream(cfg.data, spec.view(cfg), batch_size=b, seed=0, rank=0, processes=1)
        return itertools.islice(stream_epochs(stream), batches)
    dataset = build_dataset(cfg.data, spec.view(cfg), seed=0, image_size=cfg.model.img_size)
    if root.data.decode_on_device:  # the workers read bytes; `real_batches` decodes them
        dataset = encoded_dataset(dataset)
    if len(dataset) < b:
        raise DataError(f"data.path: {len(dataset)} images, fewer than bench.batch_size {b}")
    base = spec.sampler(cfg, len(dataset), 1) if spec.sampler else None
    generator, order, epoch = torch.Generator().manual_seed(0), [], 0
    while len(order) < batches * b:
        if base is None:
            order += torch.randperm(len(dataset), generator=generator).tolist()
        else:
            base.set_epoch(epoch)
            order += list(base)
        epoch += 1
    return build_loader(
        dataset,
        b,
        shuffle=False,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        pin_memory=pin_memory and cfg.data.pin_memory,
        seed=0,
        sampler=order[: batches * b],
    )


def stream_epochs(stream: StreamLoader) -> Iterator[dict[str, Any]]:
    """The batches of a stream's epochs 0, 1, 2, ... one after the other."""
    for epoch in itertools.count():
        stream.set_epoch(epoch)
        yield from stream.iterate(0)


def device_view(root: BenchRoot, method: Any) -> DeviceView | None:
    """The view of `method` batched on the device when data.decode_on_device, else None."""
    if not root.data.decode_on_device:
        return None
    return METHODS[method.name].device_view(run_config(root, method))


def real_batches(
    root: BenchRoot, method: Any, batches: int, device: torch.device, pin_memory: bool = True
) -> Iterator[dict[str, Any]]:
    """`real_loader`'s batches on `device`, as the trainer gets them: copied, then with
    data.decode_on_device decoded and augmented there (the generator keyed as the trainer's)."""
    view = device_view(root, method)
    for i, batch in enumerate(real_loader(root, method, batches, pin_memory)):
        batch = to_device(batch, device)
        yield view.apply(batch, batch_generator(0, 0, i), device) if view else batch


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors (in dicts and lists) to `device`; non-blocking, which pays off from pinned memory."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, list):
        return [to_device(v, device) for v in x]
    return x


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """Asked inside the phase process: in the parent it would create a CUDA context of its own."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated in this process, or its peak RSS on CPU (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KiB


def run_phase(phase: str, root: BenchRoot, device: str, precision: str) -> PhaseResult:
    """Build the phase's module and optimizer, run warmup then timed steps of the trainer's own
    step function; in a fresh process.

    The schedule spans the timed run with one step per epoch (DINO's last layer is frozen at
    step 0 only, a warmup step). A loader-fed phase times each step from asking the loader for
    its batch to the synchronised end of the optimizer step, so waiting on the workers and the
    device copy count."""
    torch.manual_seed(0)
    mixed = "bf16" if precision == "bf16" else "no"
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed)
    dev = accelerator.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        keep_freed_memory()  # as the trainer does on the CPU
    spec = PHASES[phase]
    module = spec.build(root).train()
    step_flops = spec.count(root, module)
    total = root.bench.warmup + root.bench.steps
    train = run_config(root).train
    train.lr, train.warmup_epochs = LR, 0
    b = root.bench.batch_size
    plan = Plan(1, b, total, 1, total, total, 0, LR)
    betas = getattr(root.method, "betas", (0.9, 0.999))
    model, optimizer = accelerator.prepare(module, optimizer_for(module, train, betas))
    if spec.feed == "loader":
        batches = real_batches(root, root.method, total, dev)
    else:
        batch = synthetic_batch(root, dev, module.backbone.patch_embed.proj.in_channels)
        batches = (batch for _ in range(total))
    module.set_schedule(total, 1)
    # as the trainer compiles
    forward = compile_step(model, train.compile_backend) if train.compile else model
    stepper = Stepper(accelerator, model, module, optimizer, train, plan, forward)

    faults = []

    def step(i: int) -> Tensor:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = forward_backward(stepper, next(batches), window=1, last=True)
        optimizer_step(stepper, i)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return out["loss"].detach()

    times, loss = time_steps(step, root.bench.warmup, root.bench.steps, dev)
    return PhaseResult(
        times,
        float(loss),
        peak_memory_mib(dev),
        device_name(dev),
        torch.get_num_threads(),
        step_flops,
        faults[root.bench.warmup :],
    )


def time_steps(
    step: Callable[[int], Tensor], warmup: int, steps: int, device: torch.device
) -> tuple[list[float], Tensor]:
    """Call step(0) ... step(warmup - 1) untimed, then time step(warmup) ... each to its
    device-synchronised end; (the timed steps' wall times, the last step's return value). The
    one timing loop of every step benched here and in tools/gpu_suite.py (the official code's
    steps too), so that both sides are timed alike."""
    for i in range(warmup):
        step(i)
    synchronize(device)
    times, out = [], None
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        out = step(i)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, out


@dataclass
class LoaderResult:
    img_per_s: float
    """Images per second delivered by the DataLoader, over the timed batches."""
    workers: int
    """Loader worker processes (0 = loaded in the main process)."""
    batch_time_s: float
    """Mean seconds per batch."""

    def metrics(self) -> dict[str, float]:
        """LOADER_METRICS; per worker divides by max(workers, 1): 0 workers is one process."""
        per_worker = self.img_per_s / max(self.workers, 1)
        values = (self.img_per_s, per_worker, self.batch_time_s)
        return dict(zip(LOADER_METRICS, values, strict=True))


def run_loader(root: BenchRoot, device: str = "cpu") -> dict[str, LoaderResult]:
    """Iterate the real DataLoader of each of bench.loader_views, no model: warm up every worker,
    then time bench.loader_batches batches. Collation included; no pinning or device copy, except
    for views decoded on the device (data.decode_on_device), whose decode and augmentation on
    `device` are timed with the loader, to the synchronised end."""
    b, workers = root.bench.batch_size, root.data.num_workers
    warm, n = max(root.bench.warmup, workers), root.bench.loader_batches
    dev = torch.device(device)
    results = {}
    for name in root.bench.loader_views:
        method = root.method if root.method.name == name else method_config(name)
        if root.data.decode_on_device:
            batches = real_batches(root, method, warm + n, dev)
        else:  # host-side throughput: no pinning (nor the CUDA context it would create)
            batches = iter(real_loader(root, method, warm + n, pin_memory=False))
        for _ in range(warm):
            next(batches)
        synchronize(dev)
        start = time.perf_counter()
        for _ in range(n):
            next(batches)
        synchronize(dev)
        elapsed = time.perf_counter() - start
        results[name] = LoaderResult(n * b / elapsed, workers, elapsed / n)
        next(batches, None)  # its end: the workers, idle, stop
    return results


def run_isolated(fn: Callable[..., Any], *args: Any, what: str) -> Any:
    """`fn(*args)` in a freshly spawned process, so its peak memory is its own."""
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            raise RuntimeError(
                f"the {what} process died (out of memory? try a smaller --bench.batch_size)"
            ) from None


# ---------------------------------------------------------------------------------------------
# Config, report, entry point.


def resolve(bench: BenchConfig) -> tuple[str, str]:
    """(device, precision) that `auto` stands for on this machine."""
    device = bench.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = bench.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    return device, precision


def check(root: BenchRoot) -> None:
    """Raise ConfigError listing every invalid value (model, data and method checks are the
    trainer's; its train.batch_size is bench.batch_size here; no DeiT teacher weights needed)."""
    errors = []
    try:
        validate(run_config(root))
    except ConfigError as e:
        errors += [
            err.replace("train.batch_size", "bench.batch_size")
            for err in e.errors
            if not err.startswith(("method.teacher_weights:", "method.checkpoint:"))
        ]  # the cost is the same with any weights
    b = root.bench
    for key in ("batch_size", "steps", "loader_batches"):
        if getattr(b, key) < 1:
            errors.append(f"bench.{key}: must be >= 1, got {getattr(b, key)}")
    if b.warmup < 0:
        errors.append(f"bench.warmup: must be >= 0, got {b.warmup}")
    if b.peak_tflops < 0:
        errors.append(f"bench.peak_tflops: must be >= 0, got {b.peak_tflops}")
    for key in ("modes", "loader_views"):
        if not getattr(b, key):
            errors.append(f"bench.{key}: name at least one")
    if root.method.name in PROBES and set(b.modes) - {"compute"}:
        errors.append(f"bench.modes: {root.method.name} is timed in the compute mode only")
    elif "e2e" in b.modes:
        try:
            device_view(root, root.method)  # what the device cannot run, refused before timing
        except ConfigError as e:
            errors += e.errors
    if b.device == "cuda" and not torch.cuda.is_available():
        errors.append("bench.device: cuda asked for, but torch sees no CUDA device")
    if errors:
        raise ConfigError(errors)


def peak(
    root: BenchRoot, device: str, name: str, precision: str
) -> tuple[float | None, str | None]:
    """(peak TFLOP/s, where it comes from): --bench.peak_tflops, else the table's dense peak of
    the GPU `name`; (None, None) on CPU (no CPU peak is guessed) or for an unknown GPU."""
    if root.bench.peak_tflops:
        return root.bench.peak_tflops, "--bench.peak_tflops"
    found = flops.device_peak_tflops(name, precision) if device == "cuda" else None
    return found if found else (None, None)


def summarize(
    root: BenchRoot,
    device: str,
    precision: str,
    results: dict[str, PhaseResult],
    loader: dict[str, LoaderResult] | None = None,
) -> dict[str, Any]:
    """The final metrics: run description, FLOPs and peak, then per phase step time, img/s,
    TFLOP/s, MFU, memory, loss; the loader's img/s per view."""
    b = root.bench
    first = next(iter(results.values()), None)
    name = first.device_name if first else ""
    peak_tflops, peak_source = peak(root, device, name, precision)
    metrics: dict[str, Any] = {
        "method": root.method.name,
        "method_config": dataclasses.asdict(root.method),
        "model": root.model.name,
        "model_kwargs": root.model.timm_kwargs(),
        "batch_size": b.batch_size,
        "steps": b.steps,
        "warmup": b.warmup,
        "modes": list(b.modes),
        "precision": precision,
        "compile": root.train.compile,
        "compile_backend": root.train.compile_backend if root.train.compile else None,
        "clip_grad": root.train.clip_grad,
        "clip_mode": root.train.clip_mode,
        "device": device,
        "device_name": name or None,
        "threads": first.threads if first else torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peak_mem_kind": "cuda_max_allocated" if device == "cuda" else "process_peak_rss",
        "data_path": root.data.path,
        "decode_on_device": root.data.decode_on_device,
        "num_workers": root.data.num_workers,
        "peak_tflops": peak_tflops,
        "peak_source": peak_source,
    }
    counted = {p: r.step_flops for p, r in results.items() if r.step_flops is not None}
    method = counted.get("method") or counted.get("e2e")
    metrics |= {
        "flops_per_img": method.train if method else None,
        "forward_flops_per_img": method.forward if method else None,
        "full_token_flops_per_img": counted["full_token"].train
        if "full_token" in counted
        else None,
    }
    for phase in PHASES:
        r = results.get(phase)
        values = r.metrics(b.batch_size, peak_tflops) if r else dict.fromkeys(PHASE_METRICS)
        metrics |= {prefixed(phase, k): v for k, v in values.items()}
    base, e2e = (metrics[prefixed(p, "step_time_s")] for p in ("full_token", "e2e"))
    step = metrics["step_time_s"]
    metrics["ratio"] = step / base if step and base else None
    metrics["e2e_over_compute"] = e2e / step if step and e2e else None
    metrics["loader_views"] = list(loader) if loader is not None else []
    metrics["loader_on_device"] = metrics["loader_views"] if root.data.decode_on_device else []
    metrics["loader_batches"] = b.loader_batches if loader is not None else None
    for view, result in (loader or {}).items():
        metrics |= {f"loader_{view}_{k}": v for k, v in result.metrics().items()}
    return metrics


def prefixed(phase: str, key: str) -> str:
    """Metric name of `key` for `phase`: the method's unprefixed, the others' as `<phase>_key`."""
    return key if phase == "method" else f"{phase}_{key}"


def table(m: dict[str, Any]) -> str:
    """The metrics as a human-readable table."""
    kw = ", ".join(f"{k}={v}" for k, v in m["model_kwargs"].items())
    compiled = ", compiled" if m.get("compile") else ""
    lines = []
    rows = [p for p in PHASES if m[prefixed(p, "step_time_s")] is not None]
    if rows:
        lines.append(
            f"{m['method']} on {m['model']} ({kw}), batch {m['batch_size']}, {m['precision']}"
            f"{compiled} on {m['device']} ({m['device_name']}, {m['threads']} threads), torch "
            f"{m['torch']}, median of {m['steps']} steps after {m['warmup']} warmup"
        )
        lines.append(
            f"{'phase':<12}{'feed':<12}{'step med (s)':>14}{'step mean (s)':>15}{'img/s':>10}"
            f"{'ms/img':>10}{'TFLOP/s':>10}{'MFU':>8}{'peak mem (MiB)':>16}{'loss':>10}"
        )

    def fmt(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    for phase in rows:
        v = {k: m[prefixed(phase, k)] for k in PHASE_METRICS}
        feed = "synthetic" if PHASES[phase].feed == "synthetic" else f"loader/{m['num_workers']}w"
        lines.append(
            f"{m['method'] if phase == 'method' else phase:<12}{feed:<12}"
            f"{v['step_time_s']:>14.4f}{v['step_time_mean_s']:>15.4f}{v['img_per_s']:>10.1f}"
            f"{v['ms_per_img']:>10.2f}{fmt(v['tflops'], '.3g'):>10}{fmt(v['mfu'], '.1%'):>8}"
            f"{fmt(v['peak_mem_mib'], '.0f'):>16}{v['loss']:>10.4f}"
        )
    if m["flops_per_img"] is not None or m["full_token_flops_per_img"] is not None:
        parts = []
        if m["flops_per_img"] is not None:
            parts.append(
                f"{m['method']} step {m['flops_per_img'] / 1e9:.4g} G "
                f"(forward {m['forward_flops_per_img'] / 1e9:.4g} G)"
            )
        if m["full_token_flops_per_img"] is not None:
            parts.append(f"full-token step {m['full_token_flops_per_img'] / 1e9:.4g} G")
        lines.append("analytic FLOPs per image: " + ", ".join(parts))
    if rows:
        source = m["peak_source"]
        lines.append(
            f"MFU against {m['peak_tflops']} TFLOP/s ({source})"
            if source
            else "MFU: n/a (no known device peak; give --bench.peak_tflops)"
        )
    if m["ratio"] is not None:
        lines.append(f"ratio {m['method']} / full-token step time: {m['ratio']:.3f}")
    if m["e2e_over_compute"] is not None:
        lines.append(f"e2e / compute step time: {m['e2e_over_compute']:.3f}")
    if m["loader_views"]:
        lines.append(
            f"data loader alone: {m['data_path']} at {m['model_kwargs']['img_size']} px, batch "
            f"{m['batch_size']}, {m['num_workers']} workers, {m['loader_batches']} batches timed"
        )
        lines.append(f"{'view':<12}{'img/s':>10}{'img/s/worker':>14}{'s/batch':>10}")
        for view in m["loader_views"]:
            v = {k: m[f"loader_{view}_{k}"] for k in LOADER_METRICS}
            where = f"{view} (dev)" if view in m["loader_on_device"] else view
            lines.append(
                f"{where:<12}{v['img_per_s']:>10.1f}{v['img_per_s_per_worker']:>14.1f}"
                f"{v['batch_time_s']:>10.3f}"
            )
    return "\n".join(lines)


PROBES = {"segprobe": 150, "segfinetune": 150}
"""Evaluators the bench times (compute mode: the training step on synthetic images and masks,
their data being no pretext view; segprobe's backbone frozen, segfinetune's trained), with the
classes of their synthetic masks (ADE20K's 150)."""


def method_config(name: str) -> Any:
    """A method's default config; classes counted from data (num_classes 0, DeiT) are
    NUM_CLASSES here (a probe's PROBES), where synthetic tensors replace the data."""
    cfg = TRAINABLE[name].config()
    if getattr(cfg, "num_classes", None) == 0:
        cfg.num_classes = PROBES.get(name, NUM_CLASSES)
    return cfg


def bench_root(args: Args) -> BenchRoot:
    """The bench config tree of the method `--method` names."""
    names = [*METHODS, *PROBES]
    return BenchRoot(method=method_config(choice(args, "--method", names, "method")))


def configure(argv: list[str]) -> BenchRoot:
    """The checked bench config of a command line (what `main` runs)."""
    root, _, _ = parse(bench_root, argv, {"--method": "mae"})
    check(root)
    return root


def phases(bench: BenchConfig) -> list[str]:
    """The step phases the modes ask for, in PHASES order."""
    wanted = {
        "method": "compute" in bench.modes,
        "e2e": "e2e" in bench.modes,
        "full_token": "compute" in bench.modes and bench.baseline,
    }
    return [p for p in PHASES if wanted[p]]


def bench(root: BenchRoot) -> dict[str, Any]:
    """Run every phase of `root` (each in its own process) and return the final metrics."""
    device, precision = resolve(root.bench)
    results = {}
    for phase in phases(root.bench):
        print(f"bench: timing the {phase} step ...", file=sys.stderr, flush=True)
        results[phase] = run_isolated(run_phase, phase, root, device, precision, what=phase)
    loader = None
    if "loader" in root.bench.modes:
        print("bench: timing the data loader ...", file=sys.stderr, flush=True)
        loader = run_isolated(run_loader, root, device, what="loader")
    metrics = summarize(root, device, precision, results, loader)
    if not all(math.isfinite(r.loss) for r in results.values()):
        print("bench: warning: a non-finite loss; times may not be representative", file=sys.stderr)
    return metrics


def run(root: BenchRoot, args: Args) -> dict[str, Any]:
    """Check, time, print the table (stderr), write bench.output; the metrics."""
    check(root)
    metrics = bench(root)
    print(table(metrics), file=sys.stderr, flush=True)
    if root.bench.output:
        path = Path(root.bench.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics) + "\n")
    return metrics


def main(argv: list[str]) -> int:
    """`python tools/bench.py [--method NAME] [--section.field value ...]`: the metrics as one
    JSON line; exit status 0, or 2 on a config or data error (printed to stderr)."""
    prog = f"python tools/bench.py [--method {{{','.join([*METHODS, *PROBES])}}}]"
    return run_command(bench_root, argv, prog, run, flags={"--method": "mae"})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
