"""The run directory (DESIGN.md § Run directory): held by one run at a time, checked before a
run starts (and against the checkpoint it resumes), its log and metrics while it runs, its
exported weights at the end."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.distributed.tensor import DTensor

from ssl_vit.config import Config, ConfigError, flatten
from ssl_vit.methods.protocol import Method
from ssl_vit.train.checkpoint import (
    DamagedCheckpointError,
    check_checkpoint,
    clean_checkpoints,
    discard,
)
from ssl_vit.train.preemption import Preempted
from ssl_vit.weights import CHECKPOINTS, complete_checkpoints, save_timm, write_text_atomic

log = logging.getLogger("ssl_vit")

LOCK = "run.lock"
"""The run directory's lock file: the holder's pid, host and start time while a run holds it."""
RUN_FILES = ("config.json", "metrics.jsonl")
OLD_EXPORTS = ("backbone", "classifier", "classifier_best")
"""Exports of earlier versions, <stem>.safetensors + <stem>.json, removed by train.overwrite."""
EXPORTS = ("backbone", "backbone_ema", "classifier", "classifier_ema", "classifier_best")
"""The exports a run may write, each a timm pretrained directory (weights.save_timm)."""
RUN_DIRS = (CHECKPOINTS, "tb", *EXPORTS)
ARCHITECTURE = {f"model.{k}" for k in ("name", "img_size", "patch_size", "embed_dim", "depth")}
ARCHITECTURE |= {"model.num_heads", "method.name"}
"""Config keys a resume can never change: the model it loads is built from them."""
OPERATIONAL = {f"train.{k}" for k in ("output_dir", "resume", "resume_changes", "discard_newer")}
OPERATIONAL |= {f"train.{k}" for k in ("overwrite", "max_steps", "log_every", "keep_last")}
OPERATIONAL |= {f"train.{k}" for k in ("save_every_steps", "save_every_epochs", "compile")}
OPERATIONAL |= {"train.compile_backend", "train.eval_every_epochs", "train.image_every_epochs"}
OPERATIONAL |= {"train.log_with"}
OPERATIONAL |= {f"data.{k}" for k in ("num_workers", "pin_memory", "timeout", "max_bad_fraction")}
OPERATIONAL |= {"data.val_split", "model.grad_checkpointing"}
"""Config keys a resume may change freely: where and how often the run stops, logs, saves,
evaluates, and how fast it runs; none changes a trained weight. Any other change alters the
schedule or the data order and needs train.resume_changes allow (so does data.num_workers on a
stream, whose loader workers each read their own shards)."""


DATA_ORDER = {"processes", "train.batch_size", "train.seed", "method.repeated_aug"}
DATA_ORDER |= {"method.repeated_aug_trim"}
"""Besides data.*, the config keys that deal an epoch's samples to its batches."""


@contextlib.contextmanager
def run_lock(run_dir: Path, main: bool) -> Iterator[None]:
    """One run per directory: the main process holds a lock on run_dir/run.lock, which records
    its pid and host. A second run is refused naming the holder. The lock of a run that died is
    reported and taken over: the kernel frees it with the process."""
    if not main:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    f = open(path, "a+")  # noqa: SIM115 - held for the whole run
    try:
        f.seek(0)
        previous = f.read().strip()
        if not locked(f):
            raise ConfigError(
                [
                    f"train.output_dir: {run_dir} is in use by another run "
                    f"({previous or 'starting up'}, lock {path}): wait for it to end, stop it, or "
                    "choose another output_dir"
                ]
            )
        if previous:
            log.warning("%s: taking over the lock of a run that is gone (%s)", path, previous)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T")}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(me))
        f.flush()
        try:
            yield
        finally:  # ended, by an error too: nothing to report to the next run
            f.seek(0)
            f.truncate()
    finally:
        f.close()


def locked(f: Any) -> bool:
    """Whether the lock on `f` was taken. A POSIX record lock (lockf), not flock: the kernel frees
    it when its process dies, and forked children (loader workers) do not share it, so the
    orphaned workers of a killed run never keep its directory locked."""
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


def refuse_foreign(run_dir: Path) -> None:
    """Refuse a directory that is not empty and holds no run (none of the files a run writes,
    besides the lock and log that a refused start leaves): a run, started or resumed, never writes
    its files among a user's. Checked before anything is written there."""
    if not run_dir.is_dir():
        return
    names = {p.name for p in run_dir.iterdir()} - {LOCK, "train.log"}
    ours = {
        *RUN_FILES,
        *RUN_DIRS,
        *(f"{s}{e}" for s in OLD_EXPORTS for e in (".safetensors", ".json")),
    }
    if not names or names & ours or any(re.fullmatch(r"config\.\d+\.json", n) for n in names):
        return
    shown = sorted(f"{n}/" if (run_dir / n).is_dir() else n for n in names)
    more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
    raise ConfigError(
        [
            f"train.output_dir: {run_dir} holds files of no run ({', '.join(shown[:5])}{more}); "
            "a run writes into a directory of its own: choose a new or empty output_dir"
        ]
    )


@dataclass
class Resume:
    """A checked checkpoint to resume from, and its train state (train_state.json)."""

    path: Path
    state: dict[str, Any]
    changed: list[str] = field(default_factory=list)
    """The config keys a resume with train.resume_changes allow changed."""

    def moves_data_order(self) -> list[str]:
        """The changed keys that deal the samples otherwise (the batch size, the processes, the
        seed, the data): a map-style epoch resumed mid-way then restarts from its first batch."""
        return [k for k in self.changed if k in DATA_ORDER or k.startswith("data.")]


def prepare_run_dir(cfg: Config, accelerator: Any) -> Resume | None:
    """Check the output directory and return the checkpoint to resume from (None = fresh start).
    Every process calls it; the main one, holding the lock, cleans and moves things.

    What a crash left in checkpoints/ is removed first. A resume checks the checkpoint (every file
    there and plain; `auto` falls back past damaged ones, which are moved aside as
    `step_*.damaged`), the config against the checkpoint's and metrics.jsonl before anything is
    written. A directory holding another run is only reused with train.resume or train.overwrite,
    so a forgotten `--train.output_dir` never mixes or destroys two runs (and one holding no run
    is refused before: `refuse_foreign`).
    """
    t, run_dir, main = cfg.train, Path(cfg.train.output_dir), accelerator.is_main_process
    if main:
        clean_checkpoints(run_dir)
    accelerator.wait_for_everyone()
    if t.resume:
        read_metrics(run_dir, warn=False)  # the run's history must read back: Metrics keeps it
        source, damaged = find_resume(run_dir, t.resume, main)
        newer = []
        if source is not None:
            source.changed = check_config(cfg, source, accelerator.num_processes, main)
            newer = [
                c
                for c in complete_checkpoints(run_dir)
                if step_of(c) > source.state["step"] and c not in damaged
            ]
            if newer and not t.discard_newer:
                raise ConfigError(
                    [
                        f"train.resume: {source.path} is older than the run's newest checkpoints "
                        f"({', '.join(c.name for c in newer)}), which this run's saves would "
                        "replace: resume from the newest (--train.resume auto), or pass "
                        "--train.discard_newer true to delete them"
                    ]
                )
        accelerator.wait_for_everyone()
        if main:
            for c in damaged:
                os.replace(c, c.with_name(c.name + ".damaged"))
                log.warning("moved the damaged %s aside as %s.damaged", c, c.name)
            for c in newer:
                log.warning("deleting %s, newer than the resume source (train.discard_newer)", c)
                discard(c)
        return source
    # config.json and train.log alone are what a start that failed before training leaves
    started = run_dir.is_dir() and any(
        p.name not in ("config.json", "train.log", LOCK) for p in run_dir.iterdir()
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
        if main:
            old = [f"{stem}{ext}" for stem in OLD_EXPORTS for ext in (".safetensors", ".json")]
            for name in (*RUN_FILES, *old):
                (run_dir / name).unlink(missing_ok=True)
            for old in run_dir.glob("config.*.json"):
                old.unlink()
            (run_dir / "train.log").write_text("")  # open in append mode by run_log
            for name in RUN_DIRS:
                shutil.rmtree(run_dir / name, ignore_errors=True)
        accelerator.wait_for_everyone()
    return None


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("_")[1])


def find_resume(run_dir: Path, resume: str, main: bool) -> tuple[Resume | None, list[Path]]:
    """(the checkpoint to resume, damaged newer ones to move aside). A given path must be whole;
    `auto` takes the newest whole one, warning about each damaged one it passes."""
    if resume != "auto":
        return Resume(Path(resume), check_checkpoint(Path(resume))), []
    damaged: list[Path] = []
    errors: list[Exception] = []
    for ckpt in reversed(complete_checkpoints(run_dir)):
        try:
            return Resume(ckpt, check_checkpoint(ckpt)), damaged
        except DamagedCheckpointError as e:
            if main:
                log.warning("%s; resuming from the checkpoint before it", e)
            damaged.append(ckpt)
            errors.append(e)
    if errors:
        raise DamagedCheckpointError(f"{errors[0]}; there is no earlier checkpoint to resume from")
    return None, []


def check_config(cfg: Config, source: Resume, num_processes: int, main: bool) -> list[str]:
    """Compare `cfg` with the config the checkpoint was trained with: architecture or method
    changes are refused, schedule or data-order ones need train.resume_changes allow (and are
    logged); each listed as key: old -> new."""
    saved = json.loads((source.path / "config.json").read_text())
    old, new = flatten(saved), flatten(json.loads(cfg.to_json()))
    old["processes"], new["processes"] = source.state["num_processes"], num_processes
    if old.get("method.name") != new.get("method.name"):
        keys = ["method.name"]
    else:
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    free = OPERATIONAL - ({"data.num_workers"} if new.get("data.streaming") else set())
    keys = [k for k in keys if k not in free]  # a stream's workers each read their own shards
    changes = [f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys]
    if arch := [c for k, c in zip(keys, changes, strict=True) if k in ARCHITECTURE]:
        raise ConfigError(
            [
                f"train.resume: {source.path} was trained with another architecture or method "
                f"({'; '.join(arch)}), which a resume cannot change: start a new run (another "
                "train.output_dir)"
            ]
        )
    if changes and cfg.train.resume_changes != "allow":
        raise ConfigError(
            [
                f"train.resume: the config differs from the one {source.path} was trained with "
                f"in what sets the schedule or the data order ({'; '.join(changes)}): pass "
                "--train.resume_changes allow to resume with these changes, or drop them"
            ]
        )
    if changes and main:
        log.warning("resuming %s with changed settings: %s", source.path, "; ".join(changes))
    return keys


def write_config(run_dir: Path, text: str) -> None:
    """config.json is the config as last run; a different earlier one is kept as
    config.<n>.json (1 the oldest), so a resumed run's history stays."""
    path = run_dir / "config.json"
    if path.is_file() and path.read_text() != text:
        taken = [
            int(m[1])
            for p in run_dir.glob("config.*.json")
            if (m := re.fullmatch(r"config\.(\d+)\.json", p.name))
        ]
        shutil.copy2(path, run_dir / f"config.{max(taken, default=0) + 1}.json")
    write_text_atomic(path, text)


@contextlib.contextmanager
def run_log(run_dir: Path, accelerator: Any) -> Iterator[None]:
    """Log this run to run_dir/train.log: the main process INFO and up (also on the console),
    every other process its warnings and errors (also on stderr), each line prefixed with its
    rank when there are several, so that no process's trouble is missing from the log. Python
    warnings are logged too, and so is an error that ends the run (not a config error: the run
    may not own the directory)."""
    main, rank = accelerator.is_main_process, accelerator.process_index
    run_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"[rank {rank}] " if accelerator.num_processes > 1 else ""
    log_file = logging.FileHandler(run_dir / "train.log")  # appends: lines of all processes
    handlers = [logging.StreamHandler(), log_file]
    root = logging.getLogger()
    level = root.level
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    quiet = logging.getLogger("accelerate")  # per-file save messages would drown the run's own
    quiet_level = quiet.level
    quiet.setLevel(logging.WARNING)
    for h in handlers:
        h.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s"))
        h.setLevel(logging.NOTSET if main else logging.WARNING)
        root.addHandler(h)
    logging.captureWarnings(True)
    try:
        yield
    except BaseException as e:
        if not isinstance(e, ConfigError | KeyboardInterrupt | SystemExit):
            severity = logging.WARNING if isinstance(e, Preempted) else logging.ERROR
            error = f"{type(e).__name__}: {str(e).strip()[:2000]}"
            log_file.handle(log.makeRecord(log.name, severity, "", 0, error, (), None))
        raise
    finally:
        logging.captureWarnings(False)
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
        quiet.setLevel(quiet_level)


class Metrics:
    """metrics.jsonl (main process) and the trackers (TensorBoard), one row per call.

    A run resumed at `resumed_step` first drops the rows logged after it (by the run that
    crashed, which the resumed run logs again) and the final result, atomically, so that each
    step keeps one row; TensorBoard hides them through its purge_step (build_run).
    """

    def __init__(self, accelerator: Any, run_dir: Path, resumed_step: int | None = None):
        self.accelerator, self.path = accelerator, run_dir / "metrics.jsonl"
        self.main = accelerator.is_main_process
        if self.main and resumed_step is not None and self.path.is_file():
            rows = read_metrics(run_dir)
            kept = [r for r in rows if r.get("step", -1) <= resumed_step and "final" not in r]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, metrics: dict[str, Any], step: int, group: str) -> None:
        """A row in metrics.jsonl, and to the trackers as `group`/name (train/loss, eval/...)."""
        tags = {f"{group}/{k}": v for k, v in metrics.items() if k != "step"}
        self.accelerator.log(tags, step=step)
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


def evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """The evaluations logged so far in run_dir/metrics.jsonl (rows with a step and no loss), so
    that a resumed run reports the last and keeps comparing against the best."""
    return [r for r in read_metrics(run_dir) if "step" in r and "loss" not in r]


def first_logged(run_dir: Path) -> dict[str, Any]:
    """The first logged training step in run_dir/metrics.jsonl, so that a resumed run reports
    the run's first loss, not its own segment's; {} when there is none."""
    return next((row for row in read_metrics(run_dir) if "loss" in row), {})


def read_metrics(run_dir: Path, warn: bool = True) -> list[dict[str, Any]]:
    """The rows of run_dir/metrics.jsonl ([] when there is none). A last line cut short (a crash
    or a full disk mid-write) is left out, with a warning if `warn`; any other line that is not a
    JSON object is a ConfigError naming the file and line: the file is the run's history, which a
    resume keeps, so it is not rewritten without that line."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text(errors="replace") if path.is_file() else ""
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line) if line.strip() else {}
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if number == len(lines) and not text.endswith("\n"):
                if warn:
                    log.warning("%s:%d: leaving out a last line cut short: %r", path, number, line)
                break
            raise ConfigError(
                [
                    f"train.resume: {path}:{number} is not a JSON object ({e}: {line[:80]!r}); "
                    "the file holds the run's logged steps and evaluations, one per line: fix or "
                    "delete that line (or move the file aside to drop them all) and resume again"
                ]
            ) from None
        if row:
            rows.append(row)
    return rows


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of an FSDP-sharded parameter (a DTensor); any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def export_weights(method: Method, cfg: Config, main: bool, stem: str = "backbone") -> None:
    """Write run_dir/`stem`/ (timm's pretrained layout): the exported backbone (stems backbone*)
    or the method's timm classifier, if it has one (classifier*). Called on every process: under
    FSDP each gathers the shards (a collective); the main process writes."""
    if stem.startswith("backbone"):
        backbone = method.export_backbone()
        state, spec = backbone.state_dict(), backbone.config_dict()
        name, kwargs = spec["name"], spec["kwargs"]
    elif (classifier := method.export_classifier()) is not None:
        state, name, kwargs = classifier
    else:
        return
    state = {k: full_tensor(v) for k, v in state.items()}
    if main:
        kwargs = {"num_classes": 0, **kwargs}  # a backbone: no head
        out = Path(cfg.train.output_dir) / stem
        save_timm(state, name, kwargs, out, mean=cfg.data.mean, std=cfg.data.std)
