"""`ssl-vit bench`: time a method's training step against a full-token step of the same encoder.

    ssl-vit bench --method mae --model.name vit_base_patch16_224 --bench.batch_size 64

A step is forward + backward + AdamW step (fused on GPU, the project's param groups), as the
trainer runs it, on synthetic images held on the device, so neither data loading nor host copies
are timed. The baseline is "supervised ViT": the same backbone on all tokens, cls token -> linear
head (1000 classes) -> cross-entropy, with the same optimizer. Each phase runs in its own freshly
spawned process, so the peak memory of one never counts against the other: on GPU the peak
allocated memory, on CPU the peak resident set of the process (which includes ~0.3-0.5 GiB of
Python and library code). A table goes to stderr and the metrics as one JSON line to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.config import (
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    help_text,
    parse_args,
    pop_method,
    validate,
)
from ssl_vit.methods import METHODS
from ssl_vit.optim import build_optimizer

NUM_CLASSES = 1000
"""Classes of the full-token baseline's head (ImageNet-1k, as the supervised ViT it stands for)."""
LR = 1e-4
"""Learning rate of the timed steps; its value does not change the cost (non-zero: weights move)."""
PHASE_METRICS = (
    "step_time_s",
    "step_time_mean_s",
    "img_per_s",
    "ms_per_img",
    "peak_mem_mib",
    "loss",
)
"""What each phase reports (PhaseResult.metrics)."""


@dataclass
class BenchConfig:
    batch_size: int = 64
    """Images per step."""
    steps: int = 10
    """Timed steps per phase (median and mean are reported)."""
    warmup: int = 3
    """Untimed steps before timing (allocator, kernel selection, lazy init)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    baseline: bool = True
    """Also time the full-token supervised step of the same encoder and report the ratio."""
    output: str = ""
    """Also write the final metrics as JSON to this file ('' = stdout only)."""


@dataclass
class BenchRoot:
    """What `ssl-vit bench` runs: the encoder, the method (picked by --method) and the timing."""

    bench: BenchConfig = field(default_factory=BenchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None
    """The method's own config dataclass; its class attribute `name` picks the method."""


# ---------------------------------------------------------------------------------------------
# Phases: each builds a module with training_step(batch) -> {"loss"} from the bench config.


class FullTokenClassifier(nn.Module):
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


def build_backbone(root: BenchRoot) -> Backbone:
    return Backbone(root.model.name, **root.model.timm_kwargs())


def build_method(root: BenchRoot) -> nn.Module:
    return METHODS[root.method.name].build(build_backbone(root), root.method)


def build_full_token(root: BenchRoot) -> nn.Module:
    return FullTokenClassifier(build_backbone(root))


PHASES: dict[str, Callable[[BenchRoot], nn.Module]] = {
    "method": build_method,
    "full_token": build_full_token,
}
"""Phase name -> module builder. The method phase's metrics are reported unprefixed, the others'
under `<phase>_`."""


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

    def metrics(self, batch_size: int) -> dict[str, float | None]:
        """PHASE_METRICS: median, mean step time; img/s, ms/img at the median; memory; loss."""
        median = statistics.median(self.step_times_s)
        values = (
            median,
            statistics.fmean(self.step_times_s),
            batch_size / median,
            1e3 * median / batch_size,
            self.peak_mem_mib,
            self.loss,
        )
        return dict(zip(PHASE_METRICS, values, strict=True))


def synthetic_batch(root: BenchRoot, device: torch.device, in_chans: int) -> dict[str, Any]:
    """Standard-normal pixels on `device` in the structure the method's view gives one image
    ({"images"} for MAE, {"crops": [...]} for DINO), each tensor batched to bench.batch_size; plus
    "images" (B, C, img_size, img_size) for the full-token phase and "labels" in [0, NUM_CLASSES).
    """
    b, s = root.bench.batch_size, root.model.img_size
    view = METHODS[root.method.name].view(Config(model=root.model, method=root.method))
    item = view(torch.zeros(in_chans, s, s, dtype=torch.uint8))

    def batched(x: Any) -> Any:
        if isinstance(x, list):
            return [batched(t) for t in x]
        return torch.randn(b, *x.shape, device=device)

    return {
        "images": torch.randn(b, in_chans, s, s, device=device),
        **{key: batched(value) for key, value in item.items()},
        "labels": torch.randint(0, NUM_CLASSES, (b,), device=device),
    }


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
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KiB


def run_phase(phase: str, root: BenchRoot, device: str, precision: str) -> PhaseResult:
    """Build the phase's module and optimizer, run warmup then timed steps; in a fresh process."""
    torch.manual_seed(0)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    module = PHASES[phase](root).to(dev).train()
    betas = getattr(root.method, "betas", (0.9, 0.999))
    optimizer = build_optimizer(
        module, "adamw", TrainConfig.weight_decay, betas=betas, fused=dev.type == "cuda", lr=LR
    )
    backbone = next(m for m in module.modules() if isinstance(m, Backbone))
    batch = synthetic_batch(root, dev, backbone.patch_embed.proj.in_channels)
    total = root.bench.warmup + root.bench.steps
    if hasattr(module, "set_schedule"):  # as the trainer does (DINO's epoch-based schedules)
        module.set_schedule(total, total)

    # The trainer's before_optimizer_step is left out: it only drops gradients early in a run
    # (DINO's frozen last layer), and the bench times the steady state.
    def step(i: int) -> Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = module.training_step(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(module, "after_optimizer_step"):  # e.g. DINO's EMA teacher update
            module.after_optimizer_step(i, total)
        return loss.detach()

    for i in range(root.bench.warmup):
        step(i)
    synchronize(dev)
    times = []
    for i in range(root.bench.warmup, total):
        start = time.perf_counter()
        loss = step(i)
        synchronize(dev)
        times.append(time.perf_counter() - start)
    return PhaseResult(
        times, float(loss), peak_memory_mib(dev), device_name(dev), torch.get_num_threads()
    )


def run_isolated(phase: str, root: BenchRoot, device: str, precision: str) -> PhaseResult:
    """`run_phase` in a freshly spawned process, so its peak memory is its own."""
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(run_phase, phase, root, device, precision).result()
        except BrokenProcessPool:
            raise RuntimeError(
                f"the {phase} phase's process died (out of memory? try a smaller "
                "--bench.batch_size)"
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
    """Raise ConfigError listing every invalid value (model and method checks are the trainer's)."""
    errors = []
    try:
        validate(Config(model=root.model, method=root.method))
    except ConfigError as e:
        errors += e.errors
    b = root.bench
    for key in ("batch_size", "steps"):
        if getattr(b, key) < 1:
            errors.append(f"bench.{key}: must be >= 1, got {getattr(b, key)}")
    if b.warmup < 0:
        errors.append(f"bench.warmup: must be >= 0, got {b.warmup}")
    if b.device == "cuda" and not torch.cuda.is_available():
        errors.append("bench.device: cuda asked for, but torch sees no CUDA device")
    if errors:
        raise ConfigError(errors)


def summarize(
    root: BenchRoot, device: str, precision: str, results: dict[str, PhaseResult]
) -> dict[str, Any]:
    """The final metrics: run description, then per phase step time, img/s, memory, loss."""
    b = root.bench
    metrics: dict[str, Any] = {
        "method": root.method.name,
        "method_config": dataclasses.asdict(root.method),
        "model": root.model.name,
        "model_kwargs": root.model.timm_kwargs(),
        "batch_size": b.batch_size,
        "steps": b.steps,
        "warmup": b.warmup,
        "precision": precision,
        "device": device,
        "device_name": results["method"].device_name,
        "threads": results["method"].threads,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peak_mem_kind": "cuda_max_allocated" if device == "cuda" else "process_peak_rss",
    }
    for phase in PHASES:
        r = results.get(phase)
        values = r.metrics(b.batch_size) if r else dict.fromkeys(PHASE_METRICS)
        metrics |= {prefixed(phase, k): v for k, v in values.items()}
    base = metrics[prefixed("full_token", "step_time_s")]
    metrics["ratio"] = metrics["step_time_s"] / base if base else None
    return metrics


def prefixed(phase: str, key: str) -> str:
    """Metric name of `key` for `phase`: the method's unprefixed, the others' as `<phase>_key`."""
    return key if phase == "method" else f"{phase}_{key}"


def table(m: dict[str, Any]) -> str:
    """The metrics as a human-readable table."""
    kw = ", ".join(f"{k}={v}" for k, v in m["model_kwargs"].items())
    lines = [
        f"{m['method']} on {m['model']} ({kw}), batch {m['batch_size']}, {m['precision']} on "
        f"{m['device']} ({m['device_name']}, {m['threads']} threads), torch {m['torch']}, "
        f"median of {m['steps']} steps after {m['warmup']} warmup",
        f"{'phase':<12}{'step med (s)':>14}{'step mean (s)':>15}{'img/s':>10}{'ms/img':>10}"
        f"{'peak mem (MiB)':>16}{'loss':>10}",
    ]
    for phase in PHASES:
        v = {k: m[prefixed(phase, k)] for k in PHASE_METRICS}
        if v["step_time_s"] is None:
            continue
        mem = "n/a" if v["peak_mem_mib"] is None else f"{v['peak_mem_mib']:.0f}"
        lines.append(
            f"{m['method'] if phase == 'method' else phase:<12}{v['step_time_s']:>14.4f}"
            f"{v['step_time_mean_s']:>15.4f}{v['img_per_s']:>10.1f}{v['ms_per_img']:>10.2f}"
            f"{mem:>16}{v['loss']:>10.4f}"
        )
    if m["ratio"] is not None:
        lines.append(f"ratio {m['method']} / full-token step time: {m['ratio']:.3f}")
    return "\n".join(lines)


def configure(argv: list[str]) -> BenchRoot | None:
    """The bench config from `--method NAME` and `--section.field value` flags; None on --help."""
    name, rest = pop_method(argv)
    root = BenchRoot(method=METHODS[name].config())
    overrides, want_help = parse_args(rest)
    if want_help:
        prog = f"ssl-vit bench [--method {{{','.join(METHODS)}}}]"
        print(help_text(root, prog))
        return None
    apply_overrides(root, overrides)
    check(root)
    return root


def bench(root: BenchRoot) -> dict[str, Any]:
    """Run every phase of `root` (each in its own process) and return the final metrics."""
    device, precision = resolve(root.bench)
    phases = [p for p in PHASES if root.bench.baseline or p == "method"]
    results = {}
    for phase in phases:
        print(f"bench: timing the {phase} step ...", file=sys.stderr, flush=True)
        results[phase] = run_isolated(phase, root, device, precision)
    metrics = summarize(root, device, precision, results)
    if not all(math.isfinite(r.loss) for r in results.values()):
        print("bench: warning: a non-finite loss; times may not be representative", file=sys.stderr)
    return metrics


def main(argv: list[str]) -> int:
    """`ssl-vit bench ...`: exit status 0, or 2 on a config error (printed to stderr)."""
    try:
        root = configure(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if root is None:
        return 0
    metrics = bench(root)
    print(table(metrics), file=sys.stderr, flush=True)
    line = json.dumps(metrics)
    if root.bench.output:
        path = Path(root.bench.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    # Re-import under the package name so spawned phase processes unpickle `ssl_vit.bench.*`.
    from ssl_vit.bench import main as _main

    sys.exit(_main(sys.argv[1:]))
