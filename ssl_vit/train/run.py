"""The parts of a run, built from its config: the method (a `Method`, ssl_vit.registry), its
data, the optimizer, the training step, and what happens around the steps (logging, checkpoints,
evaluation, pictures, the final export). The loop (loop.py) only orders these calls."""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, parse_flag_from_env, send_to_device, set_seed
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from ssl_vit.config import Config, ConfigError
from ssl_vit.data import (
    SkipCounter,
    StreamLoader,
    batch_generator,
    build_loader,
    build_stream,
    check_workers,
    encoded_dataset,
    stop_watching,
    watch_workers,
)
from ssl_vit.eval.accuracy import EvalData, classification_metrics, eval_loader
from ssl_vit.eval.knn import knn_eval
from ssl_vit.eval.segmentation_eval import (
    SegReport,
    segmentation_loader,
    segmentation_metrics,
    write_table,
)
from ssl_vit.methods.protocol import Method
from ssl_vit.registry import TRAINABLE, MethodSpec, build_method
from ssl_vit.train.checkpoint import newest_finite, resume, save_checkpoint, stream_state
from ssl_vit.train.preemption import Preempted, StopRequest, StopVote, deferred_stop_signals
from ssl_vit.train.run_dir import (
    Metrics,
    Resume,
    as_best,
    evaluations,
    export_weights,
    first_logged,
)
from ssl_vit.train.state import Plan, RunError, TrainState, Window, make_plan, non_finite
from ssl_vit.train.step import Stepper, compile_step, optimizer_for
from ssl_vit.viz import dataset_images, segmentation_grid, segmentation_picture, tensorboard_images
from ssl_vit.weights import latest_checkpoint

log = logging.getLogger("ssl_vit")


def batches(loader: Any, run_dir: Path, timeout: float) -> Iterator[dict]:
    """Yield the loader's batches without letting data loading touch the global torch RNG, which
    belongs to the model (masking, drop path): resume restores it and data never shifts it.

    A worker that sends nothing for `timeout` seconds (data.timeout; 0 = wait forever) stops the
    run (RunError): the DataLoader's own timeout covers an empty queue, and a watchdog kills the
    workers a little later, for a batch already half-received from a worker that then stopped
    (the tensor's file descriptor is fetched from the worker, without a timeout). A worker that
    outlives its epoch (stopped, so deaf to the loader's SIGTERM) is killed, or the run would hang
    at exit. A worker that dies stops the run with torch's error naming it and how it ended
    (ssl_vit.data.workers; fit words it)."""
    watch_workers()
    before = {p.pid for p in multiprocessing.active_children()}
    with deferred_stop_signals():  # the workers, forked here or at the first batch
        it = iter(loader)
    first = True
    while True:
        fired, done = threading.Event(), threading.Event()
        watchdog = threading.Thread(target=watch, args=(timeout + 5, before, fired, done))
        watchdog.daemon = True
        if timeout:
            watchdog.start()
        try:
            held = deferred_stop_signals() if first else contextlib.nullcontext()
            with torch.random.fork_rng(devices=[]), held:  # a stream forks its workers here
                batch = next(it, None)
            first = False
        except (RuntimeError, OSError, EOFError) as e:
            if not (fired.is_set() or "DataLoader timed out" in str(e)):
                check_workers(cut_off=isinstance(e, OSError | EOFError))
                raise
            stop_watching()  # the workers killed below report nothing
            kill_workers(before, fired)
            raise RunError(
                f"no batch from the loader workers for {timeout:g} seconds (data.timeout): a "
                "worker is stuck or far too slow (a hung file system, a stopped process); the "
                f"newest checkpoint is {latest_checkpoint(run_dir)}: resume with --train.resume "
                "auto"
            ) from None
        finally:
            done.set()
        if batch is None:
            if kill_workers(before):
                log.warning("killed loader workers that did not exit at the epoch's end")
            return
        try:
            yield batch
        except GeneratorExit:  # the run stops elsewhere (a worker's death raised in its step):
            stop_watching()  # the loader's shutdown, next, must not raise that death again
            raise


CHECK_EVERY = 2.0
"""Seconds between the watchdog's checks on the workers while the training process waits."""


def watch(limit: float, before: set[int], fired: threading.Event, done: threading.Event) -> None:
    """The watchdog of one wait for a batch, until `done`: every CHECK_EVERY seconds it sends
    the main thread SIGCHLD, so that a worker that died is reported there (torch looks at its
    workers on SIGCHLD, which may have come before it registered the worker, or been swallowed:
    see ssl_vit.data.workers); after `limit` seconds it kills the workers (stuck)."""
    main, end = threading.main_thread().ident, time.monotonic() + limit
    while not done.wait(min(CHECK_EVERY, max(end - time.monotonic(), 0))):
        if time.monotonic() >= end:
            kill_workers(before, fired)
            return
        signal.pthread_kill(main, signal.SIGCHLD)


def kill_workers(before: set[int], fired: threading.Event | None = None) -> int:
    """SIGKILL the loader workers: this process's multiprocessing children not in `before`.
    Returns how many."""
    if fired is not None:
        fired.set()
    workers = [p for p in multiprocessing.active_children() if p.pid not in before]
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
    return len(workers)


def local(t: Tensor) -> Tensor:
    """This process's shard of an FSDP-sharded tensor (a DTensor); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Under FSDP2, the root module's own parameters (patch and position embeddings, tokens,
    heads) gathered whole for calls other than `forward` (evaluation, pictures), which skip the
    hooks that gather them; each block still gathers its own when called. Else nothing."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def evaluate(
    cfg: Config, accelerator: Accelerator, method: Method, data: EvalData
) -> dict[str, Any]:
    """Validation metrics of the model being trained on `data` (checked before the first step),
    computed on every process: top-1/top-5 of `method.predict` when it classifies, mIoU when it
    segments (with "report": the `SegReport`), else k-NN of its exported backbone. Runs in eval
    mode under a forked RNG, so whether and when it runs never changes the training itself."""
    was_training = method.training
    method.eval()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if method.segments:
                loader = segmentation_loader(cfg, data.split, accelerator, data.classes)
                d = cfg.data
                report = segmentation_metrics(
                    method.predict, loader, accelerator, data.classes, d.mean, d.std
                )
                return {f"val_{k}": v for k, v in report.metrics.items()} | {"report": report}
            if method.classifies:
                loader = eval_loader(cfg, data.split, accelerator, classes=data.classes)
                metrics = classification_metrics(method.predict, loader, accelerator)
                out = {f"val_{k}": v for k, v in metrics.items()}
                if (ema := method.ema_view()) is not None:  # the model EMA's, on the same data
                    metrics = classification_metrics(ema.predict, loader, accelerator)
                    out |= {f"val_ema_{k}": v for k, v in metrics.items()}
                return out
            return knn_eval(method.export_backbone(), cfg, accelerator, data=data)
    finally:
        method.train(was_training)


@dataclass
class Run:
    """Everything a run holds between steps. Built by `build_run`."""

    cfg: Config
    accelerator: Accelerator
    method: Method
    """The method unwrapped (its hooks); `stepper.model` is the prepared one."""
    stepper: Stepper
    dataset: Any
    loader: Any
    device_view: Any
    """The method's view batched on the device (data.decode_on_device), else None."""
    plan: Plan
    state: TrainState
    metrics: Metrics
    bar: Any
    viz_images: Tensor | None
    skips: SkipCounter
    window: Window
    eval_data: EvalData | None
    """The evaluation data, checked before the run (None when the run does not evaluate)."""
    vote: StopVote
    """Whether every process agrees to stop (a preemption signal), polled at each step."""
    first: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)
    resumed: dict[str, Any] = field(default_factory=dict)
    """The train state of the checkpoint the run resumed from ({} for a fresh start)."""
    last_saved: int = -1
    last_eval: dict[str, Any] = field(default_factory=dict)
    best_eval: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    # --- the data of an epoch -----------------------------------------------------------------

    def epoch_batches(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index in the epoch, batch on the device) from where the run stands in its epoch;
        skipped (unreadable) images counted."""
        epoch, skip = self.state.epoch, self.state.batch_in_epoch
        self.loader.set_epoch(epoch)  # the shuffling order, held by the sampler both loaders share
        if isinstance(self.loader, StreamLoader):  # from its saved position, on this process
            loader = self.loader.iterate(skip)
        else:
            loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            loader.set_epoch(epoch)  # a skipping loader would reset it to its epoch 0
        timeout = self.cfg.data.timeout if self.cfg.data.num_workers else 0
        self.dataset.set_epoch(epoch)  # the augmentation seeds
        for i, batch in enumerate(batches(loader, self.run_dir, timeout), start=skip):
            if isinstance(self.loader, StreamLoader):  # not prepared: no device placement
                batch = send_to_device(batch, self.accelerator.device)
            if self.device_view is not None:  # keyed by (seed, epoch, batch, rank): resumes exactly
                key = (self.cfg.train.seed, epoch, i, self.accelerator.process_index)
                batch = self.device_view.apply(
                    batch, batch_generator(*key), self.accelerator.device
                )
            skipped = batch.pop("skipped", [])
            self.skips.update(skipped, len(batch["index"]) - len(skipped))
            yield i, batch

    def images_in(self, batch: dict[str, Any]) -> int:
        """Images of a micro-batch over all processes."""
        return len(batch["index"]) * self.accelerator.num_processes

    # --- after an optimizer step --------------------------------------------------------------

    def log_due(self) -> bool:
        """Whether the optimizer step just made is a log step (every train.log_every, and the
        last)."""
        step = self.state.step
        return step % self.cfg.train.log_every == 0 or step == self.plan.stop_step

    def log_step(self, out: dict[str, Tensor], update: dict[str, Any], i: int) -> None:
        """Metrics of the window since the last log step: the one host sync of the window, which
        also reads whether it diverged, the skipped and repeated samples of every process (and
        the run's first step's loss, at its first log)."""
        state, w, n = self.state, self.window, self.accelerator.num_processes
        first = [] if w.first is None else [w.first[None]]
        repeated = self.loader.repeated if isinstance(self.loader, StreamLoader) else 0
        counts = torch.tensor([self.skips.total, repeated], device=w.loss.device)
        values = torch.cat([w.loss[None], w.flags(), counts.to(w.loss.dtype), *first])
        loss_sum, *flags = self.accelerator.reduce(values, "sum").tolist()
        if what := non_finite(flags[:4]):
            self.diverged(f"{what} at a step in {state.step - w.steps + 1}..{state.step}")
        skipped, repeated = flags[4:6]
        mean_loss = loss_sum / n / w.steps
        self.last = {
            "step": state.step,
            "epoch": state.epoch + (i + 1) / self.plan.batches_per_epoch,
            "loss": mean_loss,
            "lr": update["lr"],
            "weight_decay": update["weight_decay"],
            "grad_norm": float(update["grad_norm"]),
            "img_per_s": w.images / w.elapsed(),
            "skipped_images": int(skipped),
        }
        if isinstance(self.loader, StreamLoader):  # samples a stream read twice (data/streaming.py)
            self.last["repeated_samples"] = int(repeated)
        self.last |= {k: float(v) for k, v in out.items() if k != "loss"}
        if first:  # optimizer step 1's own loss, over all processes (kept in metrics.jsonl)
            self.last["first_loss"], w.first = flags[6] / n, None
        self.first = self.first or self.last
        self.metrics.log(self.last, state.step, "train")
        if self.main:
            self.method.on_log(self.last)
            self.bar.set_postfix(
                loss=f"{mean_loss:.4f}",
                lr=f"{update['lr']:.2e}",
                img_s=f"{self.last['img_per_s']:.1f}",
            )
        w.reset()

    def save(self, final: bool = False) -> None:
        """A complete checkpoint of the whole training state (every process), unless a loss or
        gradient since the last log step or a weight is not finite (one host read)."""
        named = itertools.chain(self.method.named_parameters(), self.method.named_buffers())
        floats = {k: local(t).detach() for k, t in named if t.is_floating_point()}
        nan_inf = [torch.stack((t.isnan().any(), t.isinf().any())) for t in floats.values()]
        flags = torch.cat([self.window.flags(), torch.cat(nan_inf).float()])
        flags = self.accelerator.reduce(flags, "sum").tolist()
        held = zip(floats, flags[4::2], flags[5::2], strict=True)
        bad = [(name, "NaN" if nan else "inf") for name, nan, inf in held if nan or inf]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        weight = [f"weight {bad[0][0]} held {bad[0][1]}{more}"] if bad else []  # the first
        if what := non_finite(flags[:4], *weight):
            self.diverged(f"{what} by step {self.state.step}, which was not saved")
        t = self.cfg.train
        config = self.cfg.to_json()
        stream = self.loader.state_dict() if isinstance(self.loader, StreamLoader) else None
        save_checkpoint(
            self.accelerator, self.run_dir, self.state, config, t.keep_last, final, stream
        )
        self.last_saved = self.state.step

    def preempt(self) -> None:
        """Stop on the signal every process agreed on: the checkpoint of this step (unless just
        saved), then Preempted naming it."""
        if self.last_saved != self.state.step:
            self.save()
        raise Preempted(
            f"{self.vote.request.reason}: the run stopped after step {self.state.step}; the "
            f"complete checkpoint {latest_checkpoint(self.run_dir)} holds it: resume with the "
            "same command and --train.resume auto"
        )

    def diverged(self, what: str) -> None:
        """Stop the run: a loss, gradient or weight stopped being finite (`what` was, and when)."""
        good = newest_finite(self.run_dir)
        fix = "a lower --train.base_lr (or --train.lr), or --train.clip_grad"
        then = (
            f"The newest finite checkpoint is {good}: resume from it with --train.resume {good} "
            f"and {fix} (schedule changes: add --train.resume_changes allow)"
            if good
            else f"No checkpoint was saved before: start again with {fix}"
        )
        raise RunError(f"training diverged: {what}; no checkpoint holds it. {then}")

    def save_due(self, epoch_end: bool) -> bool:
        """Whether to save now: every train.save_every_steps, and every train.save_every_epochs
        at an epoch's end (where end_epoch saves, after its pictures and before its evaluation)."""
        t, step = self.cfg.train, self.state.step
        every = round(t.save_every_epochs * self.plan.steps_per_epoch)
        due = bool(t.save_every_steps) and step % t.save_every_steps == 0
        return due or (epoch_end and bool(every) and step % every == 0)

    # --- at the end of an epoch ---------------------------------------------------------------

    def end_epoch(self) -> None:
        """Next epoch; then, when due, TensorBoard pictures, a checkpoint, an evaluation (after
        the save: a failing evaluation loses no training). Their time is left out of img/s."""
        t, state = self.cfg.train, self.state
        start = time.perf_counter()
        state.epoch += 1
        state.batch_in_epoch = 0
        if self.viz_images is not None and state.epoch % t.image_every_epochs == 0:
            self.log_images()
        if self.save_due(epoch_end=True) and self.last_saved != state.step:
            self.save()
        if t.eval_every_epochs and state.epoch % t.eval_every_epochs == 0:
            self.evaluate()
        self.window.start += time.perf_counter() - start

    def log_images(self) -> None:
        """MAE reconstructions and attention maps of the fixed images, to TensorBoard."""
        cfg = self.cfg
        with gathered(self.method):
            summaries = tensorboard_images(
                self.method, self.viz_images, cfg.data.mean, cfg.data.std
            )
        names = [t.name for t in self.accelerator.trackers]
        if not self.main or "tensorboard" not in names:
            return
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        for tag, image in summaries.items():
            writer.add_image(f"images/{tag}", image, self.state.step)

    def evaluate(self) -> None:
        """Evaluate, log, and keep the best classifier (classifier_best.*). The row and the log
        line name the split and whether it is held out; the trackers' tags are eval/<split>/."""
        epoch = self.state.step / self.plan.steps_per_epoch  # the epochs trained, as logged
        self.last_eval = {"step": self.state.step, "epoch": epoch}
        with gathered(self.method), deferred_stop_signals():  # its loader workers too
            self.last_eval |= evaluate(self.cfg, self.accelerator, self.method, self.eval_data)
        if (report := self.last_eval.pop("report", None)) is not None and self.main:
            self.segmentation_outputs(report)
        self.last_eval |= self.eval_data.result()
        self.metrics.log(self.last_eval, self.state.step, f"eval/{self.eval_data.split}")
        log.info("evaluation at step %d: %s", self.state.step, self.last_eval)
        if self.last_eval.get("val_top1", -1.0) > self.best_eval.get("best_val_top1", -1.0):
            self.best_eval = as_best(self.last_eval)
            export_weights(self.method, self.cfg, self.main, "classifier_best")

    def segmentation_outputs(self, report: SegReport) -> None:
        """The per-class table (segmentation_<split>.csv) and the picture of images | ground
        truth | prediction (segmentation_<split>.png, and TensorBoard's images/segmentation)."""
        split, classes = self.eval_data.split, self.eval_data.classes
        write_table(self.run_dir / f"segmentation_{split}.csv", report.table)
        if not report.samples:
            return
        segmentation_picture(report.samples, classes, self.run_dir / f"segmentation_{split}.png")
        if "tensorboard" in [t.name for t in self.accelerator.trackers]:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            grid = segmentation_grid(report.samples, len(classes))
            writer.add_image(f"images/segmentation_{split}", grid, self.state.step)

    # --- the end of the run -------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Final pictures and checkpoint, unless done before (by the last epoch's end, or by the
        run this one resumed at its last step); the exports; the final evaluation unless logged
        at this step already; the result."""
        t, state = self.cfg.train, self.state
        self.bar.close()
        # resumed from the final checkpoint, which follows the pictures below
        done = self.resumed.get("final") and self.resumed["step"] == state.step
        if (
            self.viz_images is not None
            and not done
            and not (state.batch_in_epoch == 0 and state.epoch % t.image_every_epochs == 0)
        ):
            self.log_images()  # the final model, unless the last epoch's end just logged it
        if self.last_saved != state.step:
            self.save(final=True)
        for stem in ("backbone", "classifier"):  # the model EMA's beside the raw weights
            export_weights(self.method, self.cfg, self.main, stem)
            if (ema := self.method.ema_view()) is not None:
                export_weights(ema, self.cfg, self.main, f"{stem}_ema")
        if t.eval_every_epochs and self.last_eval.get("step") != state.step:
            self.evaluate()
        result = {
            "run_dir": str(self.run_dir),
            "steps": state.step,
            "first_loss": self.first.get("first_loss", self.first.get("loss")),
            "final_loss": self.last.get("loss"),
            "skipped_images": self.last.get("skipped_images", self.skips.total),
            "peak_lr": self.plan.peak_lr,
        } | {k: v for k, v in self.last_eval.items() if k not in ("step", "epoch")}
        if "repeated_samples" in self.last:
            result["repeated_samples"] = self.last["repeated_samples"]
        result |= self.best_eval
        if self.eval_data is not None:
            result |= self.eval_data.result()
        self.metrics.write({"final": result})
        self.accelerator.end_training()
        return result


def build_data(cfg: Config, spec: MethodSpec, accelerator: Accelerator) -> tuple[Any, Any, Any]:
    """(dataset, loader, device view or None): the method's view over cfg.data, its sample
    order, the loader; with data.decode_on_device, workers read bytes and the view runs batched
    on the device."""
    t = cfg.train
    if cfg.data.streaming:
        if spec.sampler and getattr(spec.sampler(cfg, 1, 1), "repeats", 1) > 1:
            raise ConfigError(
                [
                    "data.streaming: repeated augmentation (method.repeated_aug > 1) draws from a "
                    "map-style dataset; pass --method.repeated_aug 1 to train on a stream"
                ]
            )
        loader = build_stream(
            cfg.data,
            spec.view(cfg),
            batch_size=t.batch_size,
            seed=t.seed,
            rank=accelerator.process_index,
            processes=accelerator.num_processes,
        )
        return loader.dataset, loader, spec.device_view(cfg) if cfg.data.decode_on_device else None
    dataset = spec.dataset(cfg.data, spec.view(cfg), seed=t.seed, image_size=cfg.model.img_size)
    device_view = None
    if cfg.data.decode_on_device:
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
        timeout=cfg.data.timeout,
    )
    return dataset, loader, device_view


def log_start(cfg: Config, accelerator: Accelerator, plan: Plan, images: int) -> None:
    """The run's arithmetic in one line of train.log; a warning when FSDP was asked for where
    Accelerate cannot shard, and one when an epoch is shorter than an optimizer step."""
    t = cfg.train
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and not fsdp:
        log.warning(
            "FSDP was asked for (ACCELERATE_USE_FSDP) but Accelerate runs %s: it shards only "
            "over GPU (or other accelerator) processes; the model is replicated, not sharded",
            accelerator.distributed_type.value,
        )
    if accelerator.num_processes == 1 and parse_flag_from_env("ACCELERATE_USE_CPU"):
        log.warning(
            "1 process: `accelerate launch --cpu` starts one whatever --num_processes says; "
            "for several CPU processes launch with --multi_gpu (gloo on a machine without GPUs)"
        )
    log.info(
        "%d images, effective batch %d = %d per device x %d processes x %d accumulation; "
        "peak lr %.3g; %d steps (%d per epoch), stopping at %d; distributed %s, mixed "
        "precision %s%s%s",
        images,
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
    if plan.batches_per_epoch < plan.accum:  # the epoch's end cuts every window short
        per_step = t.batch_size * accelerator.num_processes
        seen = plan.batches_per_epoch * per_step
        log.warning(
            "an epoch of %d images (%d batches of %d) is shorter than one optimizer step "
            "(effective batch %d = %d x %d accumulation): each epoch makes one step of %d images, "
            "with the lr scaled for %d (peak %.3g); set --train.effective_batch %d or less",
            seen,
            plan.batches_per_epoch,
            per_step,
            plan.effective_batch,
            per_step,
            plan.accum,
            seen,
            plan.effective_batch,
            plan.peak_lr,
            seen,
        )


def build_run(
    cfg: Config,
    accelerator: Accelerator,
    resume_from: Resume | None,
    eval_data: EvalData | None,
    request: StopRequest | None = None,
) -> Run:
    """The method, its data and optimizer, prepared by Accelerate; resumed from `resume_from`
    (metrics.jsonl and TensorBoard then drop what was logged after its step); `request` is the
    signal that asks it to stop (stop_on_signals)."""
    t, main = cfg.train, accelerator.is_main_process
    set_seed(t.seed)
    spec = TRAINABLE[cfg.method.name]
    method = build_method(cfg, init=resume_from is None)  # resume replaces model.init's weights
    dataset, loader, device_view = build_data(cfg, spec, accelerator)
    optimizer = optimizer_for(method, t, cfg.method.betas)
    if isinstance(loader, StreamLoader):  # each process reads its own part: not prepared
        model, optimizer = accelerator.prepare(method, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(method, optimizer, loader)
    state = TrainState()
    if resume_from is not None:
        resume(accelerator, model, resume_from.path, state, resume_from.state)
        saved = stream_state(resume_from.path, accelerator.process_index)
        if isinstance(loader, StreamLoader) and saved is not None:
            loader.load_state_dict(saved)  # a stream restarts its epoch itself when it must
        elif state.batch_in_epoch and (moved := resume_from.moves_data_order()):
            if main:
                log.warning(
                    "the data order changed (%s): epoch %d restarts from its first batch, its "
                    "%d batches trained before the resume read again",
                    ", ".join(moved),
                    state.epoch,
                    state.batch_in_epoch,
                )
            state.batch_in_epoch = 0
    plan = make_plan(cfg, accelerator.num_processes, len(loader))
    if main:
        log_start(cfg, accelerator, plan, len(dataset))
    run_dir = Path(t.output_dir)
    # a resume (at step 0 when `auto` found no checkpoint) drops what the crash logged after it
    resumed = state.step if t.resume else None
    metrics = Metrics(accelerator, run_dir, resumed)
    accelerator.wait_for_everyone()  # metrics.jsonl rewritten before any process reads it
    purge = {"purge_step": state.step + 1} if t.resume else {}
    accelerator.init_trackers("ssl_vit", init_kwargs={"tensorboard": purge})  # tb/ssl_vit/
    viz_images = None
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if t.image_every_epochs and (main or fsdp):  # under FSDP every process joins the forward
        viz_images = dataset_images(cfg.data, 8, cfg.model.img_size).to(accelerator.device)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.set_schedule(plan.total_steps, plan.steps_per_epoch)
    forward = compile_step(model, t.compile_backend) if t.compile else model
    evals = evaluations(run_dir) if resume_from else []
    top1 = [r for r in evals if "val_top1" in r]
    bar = tqdm(
        total=plan.stop_step, initial=state.step, disable=not main, desc="train", dynamic_ncols=True
    )
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        method=unwrapped,
        stepper=Stepper(accelerator, model, unwrapped, optimizer, t, plan, forward),
        dataset=dataset,
        loader=loader,
        device_view=device_view,
        plan=plan,
        state=state,
        metrics=metrics,
        bar=bar,
        viz_images=viz_images,
        skips=SkipCounter(cfg.data.max_bad_fraction),
        window=Window(torch.zeros((), device=accelerator.device), keep_first=state.step == 0),
        eval_data=eval_data,
        first=first_logged(run_dir) if resume_from else {},
        resumed=resume_from.state if resume_from else {},
        last_saved=state.step if resume_from else -1,
        last_eval=evals[-1] if evals else {},
        best_eval=as_best(max(top1, key=lambda r: r["val_top1"])) if top1 else {},
        vote=StopVote(request or StopRequest(), accelerator.num_processes),
    )
