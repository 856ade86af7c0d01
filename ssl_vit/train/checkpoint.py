"""Run checkpoints that survive a crash, hold nothing that runs code, and resume exactly.

A checkpoint is `checkpoints/step_XXXXXXX/`: Accelerate's `save_state` (model, optimizer, each
process's RNG states) plus `train_state.json` (where the loop stands) and `config.json` (the
config it ran), written under a `.tmp` name. Only when every process has written its part does the
main process make each file readable per the umask, fsync it and write the `complete` marker: the
step and every file with its size. Then the folder is renamed into place and the ones beyond
keep_last are deleted (renamed `.deleting` first, so a half-deleted folder never looks complete).

Resume checks every file before loading any: each file a run saves listed (what the code knows a
checkpoint holds, not what its marker says), present with its recorded size, and plain data —
torch files load with weights_only=True allowing only numpy's RNG types, FSDP's metadata through
an allow-listed unpickler — so a tampered file is refused naming it and the offending global, and
a damaged one is named (`--train.resume auto` then falls back to the checkpoint before).
"""

from __future__ import annotations

import codecs
import errno
import json
import logging
import os
import pickle
import re
import resource
import shutil
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ssl_vit.data import worker_death
from ssl_vit.train.preemption import peer_lost
from ssl_vit.train.state import RunError, TrainState
from ssl_vit.weights import (
    CHECKPOINTS,
    COMPLETE,
    CheckpointError,
    UnsafeCheckpointError,
    complete_checkpoints,
    fsync_dir,
    load_plain,
    shareable,
    write_atomic,
)

log = logging.getLogger("ssl_vit")

TRAIN_STATE = "train_state.json"
_np_core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
RNG_GLOBALS = [_np_core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
"""What Accelerate's random_states_*.pkl pickle beyond tensors: numpy's RNG state (an array)."""
RNG_GLOBALS += [np.dtypes.UInt32DType]


TAMPERED = "ssl_vit never saves one: the file was replaced."


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that is missing, truncated or unreadable (not one that was tampered
    with): `--train.resume auto` falls back to the checkpoint before."""


def save_checkpoint(
    accelerator: Any,
    run_dir: str | Path,
    state: TrainState,
    config: str,
    keep_last: int,
    at_end: bool = False,
    stream: dict[str, Any] | None = None,
) -> Path:
    """Save the full training state of every process atomically; keep the newest `keep_last`.
    `at_end`: saved by the run's end, after its last pictures. `stream`: this process's stream
    position (data.streaming), written as stream_<process>.json.

    Called on every process (Accelerate writes per-process RNG states). Any failure of a write
    removes the partial checkpoint (the main process does) and is a RunError naming the file and
    the newest complete checkpoint, with the free space when the disk is full (`write_failed`).
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{state.step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if stream is not None:
            write_atomic(tmp / stream_file(accelerator.process_index), json.dumps(stream).encode())
        accelerator.wait_for_everyone()
        if main:
            train_state = state.state_dict() | {"num_processes": accelerator.num_processes}
            train_state["final"] = at_end
            write_atomic(tmp / TRAIN_STATE, json.dumps(train_state).encode())
            write_atomic(tmp / "config.json", config.encode())
            files = seal(tmp)
            write_atomic(tmp / COMPLETE, json.dumps({"step": state.step, "files": files}).encode())
    except Exception as e:
        if isinstance(e, RunError) or worker_death(e) or peer_lost(e, accelerator.num_processes):
            if main:  # not the save's fault: the run stops for its own reason
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        raise write_failed(e, tmp, run_dir, remove=main) from None
    if main:
        if final.exists():  # a resumed run saving the step it resumed from
            discard(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            discard(old)
    accelerator.wait_for_everyone()
    return final


def stream_file(process: int) -> str:
    """The file of a process's stream position in a checkpoint."""
    return f"stream_{process}.json"


def stream_state(checkpoint: Path, process: int) -> dict[str, Any] | None:
    """The stream position `process` saved in a (checked) checkpoint; None when it saved none."""
    f = checkpoint / stream_file(process)
    return json.loads(f.read_text()) if f.is_file() else None


def seal(folder: Path) -> dict[str, int]:
    """Every file under `folder`: made readable per the umask, fsynced; {relative path: size}."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        shareable(f)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(folder))] = f.stat().st_size
    return files


def discard(folder: Path) -> None:
    """Delete a checkpoint folder: renamed out of the `step_*` names first, so that a crash
    midway leaves a `.deleting` folder (removed at the next start), never a half checkpoint."""
    doomed = folder.with_name(folder.name + ".deleting")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def write_failed(e: Exception, tmp: Path, run_dir: str | Path, remove: bool = True) -> RunError:
    """What a failed save raises, once the partial checkpoint `tmp` is removed (by the main
    process: `remove`): a RunError naming the file being written and the newest complete
    checkpoint; for a full disk, a quota or a file-size limit (also when torch's zip writer or
    safetensors say so only in their message), with the space there is."""
    written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else 0
    failed = file_written(e, tmp)
    reached = failed.stat().st_size if failed is not None and failed.is_file() else 0
    free = shutil.disk_usage(tmp.parent).free
    if remove:
        shutil.rmtree(tmp, ignore_errors=True)
    newest = complete_checkpoints(run_dir)[-1:]
    size = sum(f.stat().st_size for f in newest[0].rglob("*") if f.is_file()) if newest else 0
    code = getattr(e, "errno", None) or int((re.findall(r"os error (\d+)", str(e)) or [0])[-1])
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    limited = limit != resource.RLIM_INFINITY
    if code not in (*FULL, errno.EFBIG):  # as torch's zip writer, which says "unexpected pos"
        if limited and reached >= limit:
            code = errno.EFBIG
        elif free < max(size, 2**20):
            code = errno.ENOSPC
    where = f"{tmp} failed" + (f" in {failed.relative_to(tmp)}" if failed else "")
    mib = 2**20
    newest_text = f"The newest complete one is {newest[0]}" if newest else "None was saved before"
    then = f"the partial checkpoint was removed. {newest_text}"
    if code == errno.EFBIG:
        cap = f"the file-size limit, {limit / mib:.1f} MiB (ulimit -f)" if limited else ""
        return RunError(
            f"file too large: writing the checkpoint {where}, which reached "
            f"{cap or 'the largest file its file system allows'}; {then}: raise the limit or "
            "save elsewhere, and resume with --train.resume auto"
        )
    if code in FULL:
        return RunError(
            f"{FULL[code]}: writing the checkpoint {where} after {written / mib:.1f} MiB with "
            f"{free / mib:.1f} MiB free on {tmp.parent} (a checkpoint takes about "
            f"{size / mib:.1f} MiB); {then}: free some space and resume with --train.resume auto"
        )
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return RunError(
        f"saving the checkpoint {where} ({type(e).__name__}: {first}); {then}: resume with "
        "--train.resume auto once the cause is fixed"
    )


FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
"""A save's errors that say the disk is full (os error 28, 122); EFBIG (27) is a file too large."""


def file_written(e: BaseException, tmp: Path) -> Path | None:
    """The file of `tmp` that was being written when `e` was raised: the error's own file name,
    else the path in `tmp` held by the innermost call that has one (the writer's argument)."""
    named = getattr(e, "filename", None)
    if named and Path(named).is_relative_to(tmp):
        return Path(named)
    found = None
    for frame, _ in traceback.walk_tb(e.__traceback__):  # the outermost call first
        paths = [Path(v) for v in frame.f_locals.values() if isinstance(v, str | os.PathLike)]
        found = next((p for p in paths if p != tmp and p.is_relative_to(tmp)), found)
    return found


def clean_checkpoints(run_dir: Path) -> None:
    """Remove what a crash leaves in checkpoints/: `.tmp` (a save cut short), `.deleting` (a
    deletion cut short) and step folders without their `complete` marker."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return
    complete = set(complete_checkpoints(run_dir))
    for p in sorted(root.glob("step_*")):
        leftover = p.suffix in (".tmp", ".deleting") or "." not in p.name
        if p.is_dir() and leftover and p not in complete:
            log.info("removing %s, left incomplete by an earlier run", p)
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Resume: every file checked, then loaded.


def check_checkpoint(path: Path) -> dict[str, Any]:
    """The train state of checkpoint `path` once every file it lists is there with its size and
    holds plain data, every file a checkpoint must hold (`required_files`) is listed, and no
    other file is there; DamagedCheckpointError naming the first missing, truncated or
    unreadable file, UnsafeCheckpointError naming a file that pickles anything else,
    CheckpointError naming a file added later (Accelerate would read some)."""
    try:
        files = json.loads((path / COMPLETE).read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(
            f"{path / COMPLETE}: no list of the checkpoint's files: written by an earlier "
            "ssl_vit, whose checkpoints this one does not resume"
        ) from None
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise DamagedCheckpointError(f"{f}: missing from the checkpoint")
        check_file(f)  # first: a file tampered with is refused, not taken for a damaged one
        if f.stat().st_size != size:
            raise DamagedCheckpointError(
                f"{f}: {f.stat().st_size} bytes, {size} when written: the file is damaged"
            )
    for name in required_files(path, files):
        if name not in files:
            raise DamagedCheckpointError(
                f"{path / name}: missing from the checkpoint (every checkpoint holds it; its "
                f"{COMPLETE} list of files does not name it)"
            )
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if str(f.relative_to(path)) not in files and f.name != COMPLETE:
            raise CheckpointError(
                f"{f}: not part of the checkpoint (not in its {COMPLETE} list of files); it was "
                "put there later: remove it"
            )
    return json.loads((path / TRAIN_STATE).read_text())


MODEL_FILES = ("model.safetensors", "pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0.bin")
OPTIMIZER_FILES = ("optimizer.bin", "optimizer_0/.metadata", "optimizer_0.bin")
"""What Accelerate's save_state writes for the model and the optimizer: whole, or under FSDP
sharded (a torch.distributed.checkpoint folder: its .metadata names the shards) or gathered."""


def required_files(path: Path, files: dict[str, int]) -> list[str]:
    """The files checkpoint `path` must hold, known from what a run saves, not from its marker
    (`files`, checked already): train_state.json and config.json; the model and the optimizer
    (with every shard of FSDP's folders); each process's RNG states, and on a stream
    (data.streaming) each process's stream position."""
    need = [TRAIN_STATE, "config.json"]
    if not set(need) <= files.keys():
        return need
    processes = json.loads((path / TRAIN_STATE).read_text()).get("num_processes")
    if not isinstance(processes, int) or processes < 1:
        raise DamagedCheckpointError(f"{path / TRAIN_STATE}: no number of processes in it")
    data = json.loads((path / "config.json").read_text()).get("data", {})
    for kinds in (MODEL_FILES, OPTIMIZER_FILES):
        saved = next((name for name in kinds if name in files), kinds[0])
        need.append(saved)
        if saved.endswith("/.metadata") and saved in files:
            need += shard_files(path, saved)
    need += [f"random_states_{rank}.pkl" for rank in range(processes)]
    if data.get("streaming"):
        need += [stream_file(rank) for rank in range(processes)]
    return need


def shard_files(path: Path, metadata: str) -> list[str]:
    """The shards that the .metadata of a torch.distributed.checkpoint folder in `path` names."""
    f = path / metadata
    with open(f, "rb") as fh:
        index = PlainUnpickler(fh, f).load()
    try:
        names = {info.relative_path for info in index.storage_data.values()}
    except AttributeError:
        raise DamagedCheckpointError(f"{f}: not the metadata of a sharded checkpoint") from None
    return sorted(str(Path(metadata).parent / name) for name in names)


def check_file(f: Path) -> None:
    """Whether a checkpoint file reads as plain data, without loading more than its header."""
    try:
        if f.suffix == ".safetensors":
            with safe_open(f, "pt"):
                pass
        elif f.suffix == ".json" or f.name == COMPLETE:
            json.loads(f.read_text())
        elif f.name == ".metadata":  # torch.distributed.checkpoint (FSDP): a plain pickle
            with open(f, "rb") as fh:
                PlainUnpickler(fh, f).load()
        elif f.suffix in (".pkl", ".bin", ".pt", ".pth"):
            load_plain(f, RNG_GLOBALS, advice=TAMPERED)
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise DamagedCheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from None


class PlainUnpickler(pickle.Unpickler):
    """Unpickles the metadata of torch.distributed.checkpoint (FSDP's sharded checkpoints), which
    torch reads with plain pickle: only its own dataclasses, torch sizes, dtypes and layouts and
    paths are built; any other global is refused before it is loaded."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {"torch.Size", "torch.serialization._get_layout", "collections.OrderedDict"}
    NAMES |= {"pathlib.PosixPath", "pathlib.PurePosixPath"}

    def __init__(self, file: Any, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        known = f"{module}.{name}" in self.NAMES
        if known or module in self.MODULES or module == "torch":  # modules torch has imported
            obj = super().find_class(module, name)
            if (
                known
                or isinstance(obj, torch.dtype)
                or (module in self.MODULES and isinstance(obj, type))
            ):
                return obj
        raise UnsafeCheckpointError(self.path, f"{module}.{name}", "checkpoint metadata", TAMPERED)


def resume(
    accelerator: Any, model: Any, checkpoint: Path, state: TrainState, saved: dict[str, Any]
) -> None:
    """Load a checked complete checkpoint into everything registered with `accelerator` (the
    prepared `model`, optimizer, RNG) and `state` (its train_state.json, `saved`); a model of
    other shapes is refused listing them first."""
    weights = checkpoint / "model.safetensors"
    if weights.is_file():  # FSDP checkpoints hold shards instead
        # as Accelerate saves them: the unwrapped model's keys (DDP's are `module.`-prefixed)
        unwrapped = accelerator.unwrap_model(model)
        want = {k: tuple(v.shape) for k, v in unwrapped.state_dict().items()}
        with safe_open(weights, "pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        if mismatch := sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k)):
            listed = ", ".join(
                f"{k} {have.get(k, 'absent')} vs {want.get(k, 'absent')}" for k in mismatch[:8]
            )
            raise CheckpointError(
                f"{weights}: does not fit the model of this config ({len(mismatch)} tensors "
                f"differ, checkpoint vs model: {listed})"
            )
    accelerator.load_state(str(checkpoint))
    rng = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    if rng.is_file() and not torch.equal(
        torch.get_rng_state(), load_plain(rng, RNG_GLOBALS)["torch_manual_seed"]
    ):  # Accelerate swallows a failed RNG load
        raise CheckpointError(f"{rng}: the random states were not restored")
    state.load_state_dict(saved)
    log.info(
        "resumed from %s at step %d (epoch %d, batch %d)",
        checkpoint,
        state.step,
        state.epoch,
        state.batch_in_epoch,
    )


def newest_finite(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose weights are all finite (a save refuses others; this
    also judges checkpoints of earlier versions); FSDP's sharded ones are taken as they are."""
    for ckpt in reversed(complete_checkpoints(run_dir)):
        weights = ckpt / "model.safetensors"
        if not weights.is_file():
            return ckpt
        with safe_open(weights, "pt") as f:
            if all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys()):  # noqa: SIM118
                return ckpt
    return None
