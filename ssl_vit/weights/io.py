"""Safe readers and atomic writers: the only file I/O of checkpoints.

Reading never runs pickled code (`torch.load(weights_only=True)`, or safetensors); writing goes
through a fsynced temporary file renamed into place, so a crash leaves the old file or the new one.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and says why."""


class UnsafeCheckpointError(CheckpointError):
    """A file that pickles an object which could run code when loaded; nothing in it was run."""

    def __init__(self, path: Path, name: str, plain: str, advice: str = ""):
        super().__init__(
            f"{path}: refused: it holds a pickled object ({name}) other than {plain}, which "
            f"could run code when loaded; nothing in it was run. {advice}".strip()
        )


def read_checkpoint(path: str | Path) -> Any:
    """The object in a safetensors or torch.save file, loaded without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, JSON header
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(
                f"{path}: not a readable PyTorch or safetensors checkpoint ({e})"
            ) from None
    plain, advice = (
        "tensors, containers and argparse.Namespace",
        "If you trust the file, re-save only its state dict.",
    )
    return load_plain(path, [argparse.Namespace], plain, advice)


def load_plain(
    path: Path, allowed: list[Any], plain: str = "tensors and plain data", advice: str = ""
) -> Any:
    """torch.load(weights_only=True) of `path`, allowing the `allowed` globals beyond tensors and
    containers (`plain` says which in messages). A file holding any other pickled object is
    refused naming it and `advice`, without running anything; an unreadable one is named with
    the reason."""
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        # torch's wording varies by version ("Unsupported global: GLOBAL m.f", "unsupported
        # GLOBAL m.f whose module m is blocked"); its advice (weights_only=False) is not ours
        if found := re.search(r"GLOBAL ([\w.]+)", str(e)):
            raise UnsafeCheckpointError(path, found[1], plain, advice) from None
        reason = str(e).partition("WeightsUnpickler error:")[2].split("\n\nCheck the doc")[0]
        reason = " ".join(reason.split()) or str(e)
        raise CheckpointError(
            f"{path}: not a readable PyTorch or safetensors checkpoint ({reason})"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch or safetensors checkpoint ({type(e).__name__}: {e})"
        ) from None


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path` ({} for JSON that is no object); invalid JSON is named."""
    try:
        spec = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return spec if isinstance(spec, dict) else {}


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(Path(path), text.encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a fsynced temporary file renamed into place: a crash
    leaves the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shareable(path: Path) -> None:
    """Give `path` the mode the umask allows (0644 under the usual 022): safetensors writes 0600,
    which teammates on a shared cluster cannot read. (Reading the umask means setting it.)"""
    umask = os.umask(0o22)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
