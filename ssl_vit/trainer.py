"""The one training loop: every method and evaluator trains through `fit`.

Accelerate provides distribution (DDP/FSDP over any number of processes and nodes), mixed precision,
state saving and trackers; this loop adds the MAE/DINO/DeiT conventions: effective batch reached by
accumulation, lr scaled by batch, per-iteration warmup + cosine, weight-decay exemptions, logging
every N steps without a host sync per step, atomic checkpoints and exact mid-epoch resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, ProjectConfiguration, parse_flag_from_env, set_seed
from torch import nn
from tqdm.auto import tqdm

from ssl_vit.backbone import Backbone
from ssl_vit.checkpoint import (
    BACKBONE_CONFIG,
    BACKBONE_WEIGHTS,
    CHECKPOINTS,
    export_timm,
    latest_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from ssl_vit.config import Config, ConfigError, validate
from ssl_vit.data import (
    SkipCounter,
    batch_generator,
    build_dataset,
    build_loader,
    encoded_dataset,
)
from ssl_vit.eval.accuracy import classification_metrics, eval_loader
from ssl_vit.methods import METHODS
from ssl_vit.optim import build_optimizer, warmup_cosine

log = logging.getLogger("ssl_vit")

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


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint so resume continues mid-epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, d: dict[str, int]) -> None:
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


def batches(loader: Any) -> Iterator[dict]:
    """Yield the loader's batches without letting data loading touch the global torch RNG, which
    belongs to the model (masking, drop path): resume restores it and data never shifts it."""
    it = iter(loader)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(it, None)
        if batch is None:
            return
        yield batch


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global gradient norm, as a device tensor (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_per_param_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """DINO's clipping: scale each parameter's gradient to norm <= max_norm on its own, on the
    device without a host sync. Returns the global norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms])
    return torch.linalg.vector_norm(torch.stack(norms))


def compile_step(model: nn.Module, backend: str = "inductor") -> Any:
    """torch.compile of the (prepared) method, whose forward is the whole training step: masking,
    encoder, decoder or heads, loss. Static shapes (dynamic=False): the batch size and every crop
    resolution are fixed, so one graph compiles once, with no dynamic-shape recompile."""
    return torch.compile(model, backend=backend, dynamic=False)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded parameter (a DTensor); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def export_weights(method: nn.Module, run_dir: Path, main: bool, stem: str = "backbone") -> None:
    """Write the exported backbone (stem "backbone") or the method's timm classifier (any other
    stem). Called on every process: under FSDP each gathers the shards (a collective); the main
    process writes."""
    if stem == "backbone":
        backbone = exported_backbone(method)
        state, spec = backbone.state_dict(), backbone.config_dict()
        name, kwargs = spec["name"], spec["kwargs"]
    else:
        state, name, kwargs = method.export_classifier()
    state = {k: full_tensor(v) for k, v in state.items()}
    if main:
        export_timm(state, name, kwargs, run_dir, stem)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Under FSDP2, the root module's own parameters (patch and position embeddings, tokens,
    heads) gathered whole for calls other than `forward` (evaluation, pictures), which skip the
    hooks that gather them; each block still gathers its own when called. Else nothing."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def exported_backbone(method: nn.Module) -> Backbone:
    """The backbone a method exports: its own choice (DINO: the teacher's), else `.backbone`."""
    return method.export_backbone() if hasattr(method, "export_backbone") else method.backbone


def evaluate(cfg: Config, accelerator: Accelerator, method: nn.Module) -> dict[str, float]:
    """Validation metrics of the model being trained, computed on every process: top-1/top-5 of
    `method.predict` when it classifies, else k-NN of its exported backbone. Runs in eval mode
    under a forked RNG, so whether and when it runs never changes the training itself."""
    was_training = method.training
    method.eval()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if hasattr(method, "predict"):
                loader = eval_loader(cfg, cfg.data.val_split, accelerator)
                metrics = classification_metrics(method.predict, loader, accelerator)
                return {f"val_{k}": v for k, v in metrics.items()}
            from ssl_vit.eval.knn import knn_eval  # written with the DINO method

            return knn_eval(exported_backbone(method), cfg, accelerator)
    finally:
        method.train(was_training)


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


def fit(cfg: Config) -> dict[str, Any]:
    """Train `cfg` end to end: run directory, checkpoints, resume, export. Returns final metrics."""
    validate(cfg)
    t = cfg.train
    run_dir = Path(t.output_dir)
    cuda = torch.cuda.is_available()
    precision = {"auto": "bf16" if cuda else "no", "fp32": "no"}.get(t.precision, t.precision)
    accelerator = Accelerator(
        cpu=not cuda,  # makes a multi-process launch on a GPU-less machine use gloo (MULTI_CPU)
        mixed_precision=precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True,
            data_seed=t.seed,
            non_blocking=cfg.data.pin_memory and cuda,  # async copies from pinned memory: no sync
        ),
    )
    main = accelerator.is_main_process
    resume_from = prepare_run_dir(cfg, main)
    accelerator.wait_for_everyone()
    with run_log(run_dir, main):
        if main:
            write_text_atomic(run_dir / "config.json", cfg.to_json())
        return train(cfg, accelerator, resume_from)


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


def train(cfg: Config, accelerator: Accelerator, resume_from: Path | None) -> dict[str, Any]:
    t = cfg.train
    run_dir = Path(t.output_dir)
    main = accelerator.is_main_process
    set_seed(t.seed)
    spec = METHODS[cfg.method.name]
    # evaluators start from a pretrained checkpoint; pretext methods from a fresh backbone
    backbone = (
        spec.backbone(cfg) if spec.backbone else Backbone(cfg.model.name, **cfg.model.timm_kwargs())
    )
    backbone.set_grad_checkpointing(cfg.model.grad_checkpointing)
    method = spec.build(backbone, cfg.method)
    dataset = build_dataset(cfg.data, spec.view(cfg), seed=t.seed, image_size=cfg.model.img_size)
    device_view = None
    if cfg.data.decode_on_device:  # workers read bytes; decoding and augmentation on the device
        device_view = spec.device_view(cfg)
        dataset = encoded_dataset(dataset)
    sampler = spec.sampler(cfg, len(dataset), accelerator.num_processes) if spec.sampler else None
    loader = build_loader(
        dataset,
        t.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
        seed=t.seed,
        sampler=sampler,
    )
    optimizer = build_optimizer(
        method, t.optimizer, t.weight_decay, betas=cfg.method.betas, momentum=t.momentum
    )
    for g in optimizer.param_groups:  # the weight-decay schedule scales each group's own value
        wd_scale = g["weight_decay"] / t.weight_decay if t.weight_decay else 0.0
        g.setdefault("wd_scale", wd_scale)  # a method's param_groups() may give it directly
    model, optimizer, loader = accelerator.prepare(method, optimizer, loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            resume_from,
            state.step,
            state.epoch,
            state.batch_in_epoch,
        )
    step_fn = compile_step(model, t.compile_backend) if t.compile else model
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and not fsdp and main:
        log.warning(
            "FSDP was asked for (ACCELERATE_USE_FSDP) but Accelerate runs %s: it shards only "
            "over GPU (or other accelerator) processes; the model is replicated, not sharded",
            accelerator.distributed_type.value,
        )
    plan = make_plan(cfg, accelerator.num_processes, len(loader))
    if main:
        log.info(
            "%d images, effective batch %d = %d per device x %d processes x %d accumulation; "
            "peak lr %.3g; %d steps (%d per epoch), stopping at %d; distributed %s, mixed "
            "precision %s%s%s",
            len(dataset),
            plan.effective_batch,
            t.batch_size,
            accelerator.num_processes,
            plan.accum,
            plan.peak_lr,
            plan.total_steps,
            plan.steps_per_epoch,
            plan.stop_step,
            accelerator.distributed_type.value,
            accelerator.mixed_precision,
            ", compiled" if t.compile else "",
            ", activation checkpointing" if cfg.model.grad_checkpointing else "",
        )
    accelerator.init_trackers("tb")
    viz_images = None
    if t.image_every_epochs and (main or fsdp):  # under FSDP every process joins the forward
        from ssl_vit.viz import dataset_images, tensorboard_images  # matplotlib only when asked

        viz_images = dataset_images(cfg.data, 8, cfg.model.img_size).to(accelerator.device)

    unwrapped = accelerator.unwrap_model(model)
    if hasattr(unwrapped, "set_schedule"):  # methods with epoch-based schedules (DINO)
        unwrapped.set_schedule(plan.total_steps, plan.steps_per_epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    skips = SkipCounter(cfg.data.max_bad_fraction)
    bar = tqdm(
        total=plan.stop_step, initial=state.step, disable=not main, desc="train", dynamic_ncols=True
    )
    window_loss = torch.zeros((), device=accelerator.device)
    window_images, window_steps, window_start = 0, 0, time.perf_counter()
    first: dict[str, Any] = {}
    last: dict[str, Any] = {}
    last_saved = state.step if resume_from is not None else -1
    last_eval: dict[str, Any] = {}
    best_eval = best_evaluation(run_dir) if resume_from is not None else {}
    n, accum = plan.batches_per_epoch, plan.accum
    full_windows_end = (n // accum) * accum

    def save() -> None:
        nonlocal last_saved
        save_checkpoint(accelerator, run_dir, state.step, t.keep_last)
        last_saved = state.step

    def log_metrics(metrics: dict[str, Any]) -> None:
        accelerator.log(metrics, step=state.step)
        if main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def log_images() -> None:
        with gathered(unwrapped):
            summaries = tensorboard_images(unwrapped, viz_images, cfg.data.mean, cfg.data.std)
        if not main:
            return
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for tag, image in summaries.items():
            writer.add_image(tag, image, state.step)

    def run_eval() -> None:
        nonlocal last_eval, best_eval
        last_eval = {"step": state.step, "epoch": state.epoch}
        with gathered(unwrapped):
            last_eval |= evaluate(cfg, accelerator, unwrapped)
        log_metrics(last_eval)
        log.info("evaluation at step %d: %s", state.step, last_eval)
        if last_eval.get("val_top1", -1.0) > best_eval.get("best_val_top1", -1.0):
            best_eval = as_best(last_eval)
            if hasattr(unwrapped, "export_classifier"):
                export_weights(unwrapped, run_dir, main, "classifier_best")

    while state.step < plan.stop_step:
        skip = state.batch_in_epoch
        loader.set_epoch(state.epoch)  # the shuffling order, held by the sampler both loaders share
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch_loader.set_epoch(state.epoch)  # a skipping loader would reset it to its epoch 0
        dataset.set_epoch(state.epoch)  # the augmentation seeds
        for i, batch in enumerate(batches(epoch_loader), start=skip):
            if device_view is not None:  # keyed by (seed, epoch, batch, rank): resumes exactly
                key = (t.seed, state.epoch, i, accelerator.process_index)
                batch = device_view.apply(batch, batch_generator(*key), accelerator.device)
            skipped = batch.pop("skipped", [])
            skips.update(skipped, len(batch["index"]) - len(skipped))
            boundary = (i + 1) % accum == 0 or i + 1 == n
            window = accum if i < full_windows_end else n - full_windows_end
            sync = contextlib.nullcontext() if boundary else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    out = step_fn(batch)
                accelerator.backward(out["loss"] / window)
            window_loss += out["loss"].detach() / window
            window_images += len(batch["index"]) * accelerator.num_processes
            if not boundary:
                continue

            lr = warmup_cosine(
                state.step, plan.total_steps, plan.warmup_steps, plan.peak_lr, t.min_lr
            )
            wd = t.weight_decay
            if t.weight_decay_end is not None:
                wd = warmup_cosine(state.step, plan.total_steps, 0, wd, t.weight_decay_end)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
                g["weight_decay"] = wd * g["wd_scale"]
            logging_step = (state.step + 1) % t.log_every == 0 or state.step + 1 == plan.stop_step
            if hasattr(unwrapped, "before_optimizer_step"):  # e.g. DINO's frozen last layer
                unwrapped.before_optimizer_step(state.step)
            gnorm = None
            if t.clip_grad and t.clip_mode == "param":
                accelerator.unscale_gradients()
                gnorm = clip_per_param_(trainable, t.clip_grad)
            elif t.clip_grad:
                gnorm = accelerator.clip_grad_norm_(trainable, t.clip_grad)
            elif logging_step:
                gnorm = grad_norm(trainable)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(unwrapped, "after_optimizer_step"):
                unwrapped.after_optimizer_step(state.step, plan.total_steps)
            state.step += 1
            state.batch_in_epoch = i + 1
            window_steps += 1
            bar.update(1)

            if logging_step:
                mean_loss = accelerator.reduce(window_loss, "mean").item() / window_steps
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"loss is {mean_loss} at step {state.step}; the last good checkpoint is "
                        f"{latest_checkpoint(run_dir)}"
                    )
                elapsed = time.perf_counter() - window_start
                last = {
                    "step": state.step,
                    "epoch": state.epoch + (i + 1) / n,
                    "loss": mean_loss,
                    "lr": lr,
                    "weight_decay": wd,
                    "grad_norm": float(gnorm),
                    "img_per_s": window_images / elapsed,
                    "skipped_images": skips.total,
                }
                last |= {k: float(v) for k, v in out.items() if k != "loss"}
                first = first or last
                log_metrics(last)
                if main and hasattr(unwrapped, "on_log"):  # e.g. DINO's collapse warnings
                    unwrapped.on_log(last)
                if main:
                    bar.set_postfix(
                        loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{last['img_per_s']:.1f}"
                    )
                window_loss.zero_()
                window_images, window_steps, window_start = 0, 0, time.perf_counter()

            if t.save_every_steps and state.step % t.save_every_steps == 0:
                save()
            if state.step >= plan.stop_step:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            if viz_images is not None and state.epoch % t.image_every_epochs == 0:
                log_images()
            if t.eval_every_epochs and state.epoch % t.eval_every_epochs == 0:
                run_eval()
            every = round(t.save_every_epochs * plan.steps_per_epoch)
            if every and state.step % every == 0 and last_saved != state.step:
                save()
    bar.close()
    if viz_images is not None and not (
        state.batch_in_epoch == 0 and state.epoch % t.image_every_epochs == 0
    ):
        log_images()  # the final model, unless the last epoch's end just logged it

    if last_saved != state.step:
        save()
    if t.eval_every_epochs and last_eval.get("step") != state.step:
        run_eval()
    export_weights(unwrapped, run_dir, main)
    if hasattr(unwrapped, "export_classifier"):
        export_weights(unwrapped, run_dir, main, "classifier")
    result = {
        "run_dir": str(run_dir),
        "steps": state.step,
        "first_loss": first.get("loss"),
        "final_loss": last.get("loss"),
        "skipped_images": skips.total,
        "peak_lr": plan.peak_lr,
    } | {k: v for k, v in last_eval.items() if k not in ("step", "epoch")}
    result |= best_eval
    if main:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"final": result}) + "\n")
    accelerator.end_training()
    return result
