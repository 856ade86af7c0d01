"""The one training loop: every method and evaluator trains through `fit`.

Accelerate provides distribution (DDP/FSDP over any number of processes and nodes), mixed
precision, state saving and trackers; the run's parts (run.py) add the MAE/DINO/DeiT conventions:
effective batch reached by accumulation, lr scaled by batch, per-iteration warmup + cosine,
weight-decay exemptions, logging every N steps without a host sync per step, atomic checkpoints
and exact mid-epoch resume. The loop itself only orders the calls, like MAE's engine_pretrain.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration

from ssl_vit.config import Config, validate
from ssl_vit.data import stop_watching, worker_death
from ssl_vit.registry import prepare
from ssl_vit.train.preemption import peer_lost, stop_on_signals
from ssl_vit.train.run import Run, build_run, local
from ssl_vit.train.run_dir import (
    prepare_run_dir,
    refuse_foreign,
    run_lock,
    run_log,
    write_config,
)
from ssl_vit.train.state import RunError
from ssl_vit.train.step import forward_backward, keep_freed_memory, optimizer_step
from ssl_vit.weights import latest_checkpoint


def fit(cfg: Config) -> dict[str, Any]:
    """Train `cfg` end to end: run directory, checkpoints, resume, export. Returns final metrics."""
    validate(cfg)
    eval_data = prepare(cfg)  # what the data and model.init decide; before the run directory
    t = cfg.train
    run_dir = Path(t.output_dir)
    cuda = torch.cuda.is_available()
    precision = {"auto": "bf16" if cuda else "no", "fp32": "no"}.get(t.precision, t.precision)
    accelerator = Accelerator(
        cpu=not cuda,  # makes a multi-process launch on a GPU-less machine use gloo (MULTI_CPU)
        mixed_precision=precision,
        log_with=t.trackers() or None,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tb")
        ),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True,
            data_seed=t.seed,
            non_blocking=cfg.data.pin_memory and cuda,  # async copies from pinned memory: no sync
        ),
    )
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # activations in host memory: no page faults every step
    main = accelerator.is_main_process
    refuse_foreign(run_dir)
    with run_log(run_dir, accelerator), run_lock(run_dir, main), stop_on_signals() as request:
        resume_from = prepare_run_dir(cfg, accelerator)
        run = build_run(cfg, accelerator, resume_from, eval_data, request)
        if main:
            write_config(run_dir, cfg.to_json())
        try:
            return train_loop(run)
        except RuntimeError as e:
            if isinstance(e, RunError):
                raise
            newest = latest_checkpoint(run_dir)
            then = f"resume from {newest} with" if newest else "no checkpoint yet: start again,"
            if died := worker_death(e):  # torch's error, raised wherever its SIGCHLD handler ran
                stop_watching()
                resume = f"The newest checkpoint is {newest}: resume" if newest else "Start again"
                raise RunError(
                    f"{died}. {resume} with the same command and --train.resume auto"
                ) from None
            if not peer_lost(e, accelerator.num_processes):
                raise
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise RunError(
                f"another process of the run is gone or not answering ({first}): this process "
                f"stops too; {then} --train.resume auto"
            ) from None
        finally:
            run.vote.close()
            run.bar.close()  # an error's message starts on a line of its own


def train_loop(run: Run) -> dict[str, Any]:
    """Epochs of micro-batches; an optimizer step at the end of each accumulation window."""
    state, plan, stepper = run.state, run.plan, run.stepper
    while state.step < plan.stop_step:
        for i, batch in run.epoch_batches():
            # forward and backward of one micro-batch: its share of the window's mean loss
            window, last = plan.window(i), plan.boundary(i)
            out = forward_backward(stepper, batch, window, last)
            run.window.add(out["loss"].detach(), window, run.images_in(batch))
            if not last:
                continue

            # the optimizer step: schedules, hooks, clipping, update
            update = optimizer_step(stepper, state.step)
            state.step += 1
            state.batch_in_epoch = i + 1
            run.window.step(local(update["grad_norm"]))
            run.bar.update(1)

            # logging and checkpoints (at an epoch's end, end_epoch saves)
            if run.log_due():
                run.log_step(out, update, i)
            if state.step >= plan.stop_step:
                break
            if run.vote.agreed():  # a preemption signal: every process stops here, saved
                run.preempt()
            if i + 1 < plan.batches_per_epoch and run.save_due(epoch_end=False):
                run.save()
        if state.step < plan.stop_step:  # the epoch ran to its end
            run.end_epoch()
    return run.finish()
