"""The parts of a run, built from its config: the method (a `Method`, ssl_vit.registry), its
data, the optimizer, the training step, and what happens around the steps (logging, checkpoints,
evaluation, pictures, the final export). The loop (loop.py) only orders these calls."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, parse_flag_from_env, set_seed
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm

from ssl_vit.config import Config
from ssl_vit.data import SkipCounter, batch_generator, build_dataset, build_loader, encoded_dataset
from ssl_vit.eval.accuracy import classification_metrics, eval_loader
from ssl_vit.eval.knn import knn_eval
from ssl_vit.methods.protocol import Method
from ssl_vit.registry import TRAINABLE, MethodSpec
from ssl_vit.train.checkpoint import resume, save_checkpoint
from ssl_vit.train.run_dir import Metrics, as_best, best_evaluation, export_weights
from ssl_vit.train.state import Plan, TrainState, Window, make_plan
from ssl_vit.train.step import Stepper, compile_step, optimizer_for
from ssl_vit.viz import dataset_images, tensorboard_images
from ssl_vit.weights import latest_checkpoint

log = logging.getLogger("ssl_vit")


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


def evaluate(cfg: Config, accelerator: Accelerator, method: Method) -> dict[str, float]:
    """Validation metrics of the model being trained, computed on every process: top-1/top-5 of
    `method.predict` when it classifies, else k-NN of its exported backbone. Runs in eval mode
    under a forked RNG, so whether and when it runs never changes the training itself."""
    was_training = method.training
    method.eval()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if method.classifies:
                loader = eval_loader(cfg, cfg.data.val_split, accelerator)
                metrics = classification_metrics(method.predict, loader, accelerator)
                return {f"val_{k}": v for k, v in metrics.items()}
            return knn_eval(method.export_backbone(), cfg, accelerator)
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
    first: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)
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
        loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        loader.set_epoch(epoch)  # a skipping loader would reset it to its epoch 0
        self.dataset.set_epoch(epoch)  # the augmentation seeds
        for i, batch in enumerate(batches(loader), start=skip):
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
        """Whether the coming optimizer step is a log step (every train.log_every, and the last)."""
        step = self.state.step + 1
        return step % self.cfg.train.log_every == 0 or step == self.plan.stop_step

    def log_step(self, out: dict[str, Tensor], update: dict[str, Any], i: int) -> None:
        """Metrics of the window since the last log step: the one host sync of the window."""
        state, w = self.state, self.window
        mean_loss = self.accelerator.reduce(w.loss, "mean").item() / w.steps
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"loss is {mean_loss} at step {state.step}; the last good checkpoint is "
                f"{latest_checkpoint(self.run_dir)}"
            )
        self.last = {
            "step": state.step,
            "epoch": state.epoch + (i + 1) / self.plan.batches_per_epoch,
            "loss": mean_loss,
            "lr": update["lr"],
            "weight_decay": update["weight_decay"],
            "grad_norm": float(update["grad_norm"]),
            "img_per_s": w.images / w.elapsed(),
            "skipped_images": self.skips.total,
        }
        self.last |= {k: float(v) for k, v in out.items() if k != "loss"}
        self.first = self.first or self.last
        self.metrics.log(self.last, state.step)
        if self.main:
            self.method.on_log(self.last)
            self.bar.set_postfix(
                loss=f"{mean_loss:.4f}",
                lr=f"{update['lr']:.2e}",
                img_s=f"{self.last['img_per_s']:.1f}",
            )
        w.reset()

    def save(self) -> None:
        """A complete checkpoint of the whole training state (every process)."""
        t = self.cfg.train
        save_checkpoint(self.accelerator, self.run_dir, self.state.step, t.keep_last)
        self.last_saved = self.state.step

    def step_save_due(self) -> bool:
        every = self.cfg.train.save_every_steps
        return bool(every) and self.state.step % every == 0

    # --- at the end of an epoch ---------------------------------------------------------------

    def end_epoch(self) -> None:
        """Next epoch; then, when due, TensorBoard pictures, an evaluation, a checkpoint."""
        t, state = self.cfg.train, self.state
        state.epoch += 1
        state.batch_in_epoch = 0
        if self.viz_images is not None and state.epoch % t.image_every_epochs == 0:
            self.log_images()
        if t.eval_every_epochs and state.epoch % t.eval_every_epochs == 0:
            self.evaluate()
        every = round(t.save_every_epochs * self.plan.steps_per_epoch)
        if every and state.step % every == 0 and self.last_saved != state.step:
            self.save()

    def log_images(self) -> None:
        """MAE reconstructions and attention maps of the fixed images, to TensorBoard."""
        cfg = self.cfg
        with gathered(self.method):
            summaries = tensorboard_images(
                self.method, self.viz_images, cfg.data.mean, cfg.data.std
            )
        if not self.main:
            return
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        for tag, image in summaries.items():
            writer.add_image(tag, image, self.state.step)

    def evaluate(self) -> None:
        """Evaluate, log, and keep the best classifier (classifier_best.*)."""
        self.last_eval = {"step": self.state.step, "epoch": self.state.epoch}
        with gathered(self.method):
            self.last_eval |= evaluate(self.cfg, self.accelerator, self.method)
        self.metrics.log(self.last_eval, self.state.step)
        log.info("evaluation at step %d: %s", self.state.step, self.last_eval)
        if self.last_eval.get("val_top1", -1.0) > self.best_eval.get("best_val_top1", -1.0):
            self.best_eval = as_best(self.last_eval)
            export_weights(self.method, self.run_dir, self.main, "classifier_best")

    # --- the end of the run -------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Final pictures, checkpoint, evaluation and export, unless just done; the result."""
        t, state = self.cfg.train, self.state
        self.bar.close()
        if self.viz_images is not None and not (
            state.batch_in_epoch == 0 and state.epoch % t.image_every_epochs == 0
        ):
            self.log_images()  # the final model, unless the last epoch's end just logged it
        if self.last_saved != state.step:
            self.save()
        if t.eval_every_epochs and self.last_eval.get("step") != state.step:
            self.evaluate()
        export_weights(self.method, self.run_dir, self.main)
        export_weights(self.method, self.run_dir, self.main, "classifier")
        result = {
            "run_dir": str(self.run_dir),
            "steps": state.step,
            "first_loss": self.first.get("loss"),
            "final_loss": self.last.get("loss"),
            "skipped_images": self.skips.total,
            "peak_lr": self.plan.peak_lr,
        } | {k: v for k, v in self.last_eval.items() if k not in ("step", "epoch")}
        result |= self.best_eval
        self.metrics.write({"final": result})
        self.accelerator.end_training()
        return result


def build_data(cfg: Config, spec: MethodSpec, accelerator: Accelerator) -> tuple[Any, Any, Any]:
    """(dataset, loader, device view or None): the method's view over cfg.data, its sample
    order, the loader; with data.decode_on_device, workers read bytes and the view runs batched
    on the device."""
    t = cfg.train
    dataset = build_dataset(cfg.data, spec.view(cfg), seed=t.seed, image_size=cfg.model.img_size)
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
    )
    return dataset, loader, device_view


def log_start(cfg: Config, accelerator: Accelerator, plan: Plan, images: int) -> None:
    """The run's arithmetic in one line of train.log; a warning when FSDP was asked for where
    Accelerate cannot shard."""
    t = cfg.train
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and not fsdp:
        log.warning(
            "FSDP was asked for (ACCELERATE_USE_FSDP) but Accelerate runs %s: it shards only "
            "over GPU (or other accelerator) processes; the model is replicated, not sharded",
            accelerator.distributed_type.value,
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


def build_run(cfg: Config, accelerator: Accelerator, resume_from: Path | None) -> Run:
    """The method, its data and optimizer, prepared by Accelerate; resumed from `resume_from`."""
    t, main = cfg.train, accelerator.is_main_process
    set_seed(t.seed)
    spec = TRAINABLE[cfg.method.name]
    backbone = spec.backbone(cfg)  # fresh for pretext methods, the checkpoint's for evaluators
    backbone.set_grad_checkpointing(cfg.model.grad_checkpointing)
    method = spec.build(backbone, cfg.method)
    dataset, loader, device_view = build_data(cfg, spec, accelerator)
    optimizer = optimizer_for(method, t, cfg.method.betas)
    model, optimizer, loader = accelerator.prepare(method, optimizer, loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if resume_from is not None:
        resume(accelerator, resume_from, state)
    plan = make_plan(cfg, accelerator.num_processes, len(loader))
    if main:
        log_start(cfg, accelerator, plan, len(dataset))
    accelerator.init_trackers("tb")
    viz_images = None
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if t.image_every_epochs and (main or fsdp):  # under FSDP every process joins the forward
        viz_images = dataset_images(cfg.data, 8, cfg.model.img_size).to(accelerator.device)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.set_schedule(plan.total_steps, plan.steps_per_epoch)
    forward = compile_step(model, t.compile_backend) if t.compile else model
    run_dir = Path(t.output_dir)
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
        metrics=Metrics(accelerator, run_dir),
        bar=bar,
        viz_images=viz_images,
        skips=SkipCounter(cfg.data.max_bad_fraction),
        window=Window(torch.zeros((), device=accelerator.device)),
        last_saved=state.step if resume_from is not None else -1,
        best_eval=best_evaluation(run_dir) if resume_from is not None else {},
    )
