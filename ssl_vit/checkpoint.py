"""Checkpoints that survive a crash, resume, and the exported backbone.

A checkpoint is `checkpoints/step_XXXXXXX/`, written by Accelerate's `save_state` under a `.tmp`
name; only when every process has finished writing does the main process add the `complete` marker
(the last file written) and rename the folder into place. Resume only ever reads complete
checkpoints, and older ones are deleted only after the new one is complete, so a run killed at any
moment leaves its previous good state loadable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ssl_vit.backbone import Backbone

CHECKPOINTS = "checkpoints"
COMPLETE = "complete"
BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_CONFIG = "backbone.json"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / COMPLETE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator: Any, run_dir: str | Path, step: int, keep_last: int) -> Path:
    """Save the full training state of every process atomically; keep the newest `keep_last`.

    Called on every process (Accelerate writes per-process RNG states).
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_atomic(tmp / COMPLETE, json.dumps({"step": step}).encode())
        if final.exists():  # a resumed run saving the step it resumed from
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def export_timm(
    state: dict[str, Any], name: str, kwargs: dict[str, Any], run_dir: str | Path, stem: str
) -> Path:
    """Write `<stem>.safetensors` (timm key names) and `<stem>.json` (timm name + kwargs), each
    atomically: what `timm.create_model(name, **kwargs)` loads with strict=True."""
    run_dir = Path(run_dir)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    weights = run_dir / f"{stem}.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    _fsync_file(tmp)
    os.replace(tmp, weights)
    spec = {"name": name, "kwargs": kwargs}
    _write_atomic(run_dir / f"{stem}.json", json.dumps(spec, indent=2).encode())
    return weights


def export_backbone(backbone: Backbone, run_dir: str | Path) -> Path:
    """backbone.safetensors + backbone.json, for timm.create_model(name, num_classes=0)."""
    spec = backbone.config_dict()
    return export_timm(backbone.state_dict(), spec["name"], spec["kwargs"], run_dir, "backbone")


def load_backbone(path: str | Path) -> Backbone:
    """A Backbone from a run directory, or a `backbone.safetensors` with `backbone.json` beside."""
    path = Path(path)
    weights = path / BACKBONE_WEIGHTS if path.is_dir() else path
    config = weights.with_name(BACKBONE_CONFIG)
    for f in (weights, config):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f}: not found (expected a run directory holding "
                f"{BACKBONE_WEIGHTS} and {BACKBONE_CONFIG})"
            )
    spec = json.loads(config.read_text())
    backbone = Backbone(spec["name"], **spec["kwargs"])
    state = load_file(str(weights))
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights}: does not match {spec['name']} {spec['kwargs']}: missing "
            f"{result.missing_keys[:20]}, unexpected {result.unexpected_keys[:20]}"
        )
    return backbone


def write_text_atomic(path: str | Path, text: str) -> None:
    _write_atomic(Path(path), text.encode())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
