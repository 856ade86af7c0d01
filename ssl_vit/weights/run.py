"""A run's checkpoints as weights: the complete checkpoint folders of a run directory, the one a
path stands for, and the backbone a folder holds (the network the run exports, built from the
folder's own config). Saving and resuming them is ssl_vit.train.checkpoint's."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ssl_vit.config import ModelConfig
from ssl_vit.weights.io import CheckpointError, read_checkpoint, read_json
from ssl_vit.weights.paths import BACKBONE, timm_weights

CHECKPOINTS = "checkpoints"
"""A run directory's folder of training checkpoints (ssl_vit.train.checkpoint writes them)."""
COMPLETE = "complete"
"""The marker file a checkpoint folder gets last, once every process finished writing it."""
RUN_CONFIG, RUN_WEIGHTS, RUN_STATE = "config.json", "model.safetensors", "train_state.json"
"""A checkpoint folder's config as run, the method's whole state dict (Accelerate's name) and where
the loop stands."""
EXPORTED = {
    "mae": "backbone.",
    "dino": "teacher.backbone.",
    "dinov2": "teacher.backbone.",
    "dinov3": "teacher.backbone.",
    "deit": "student.backbone.",
    "linprobe": "backbone.",
    "segprobe": "backbone.",
    "segfinetune": "backbone.",
}
"""Where the backbone a run exports (`Method.export_backbone`: DINO's teacher, DeiT's student)
sits in its checkpoints' model state, by method.name (tests/test_contract.py holds it to every
method's export_backbone()). Not fine-tuning: its config does not rebuild the backbone its
classifier reshaped (global_pool)."""
STUDENTS = {"dino": "backbone.", "dinov2": "backbone.", "dinov3": "backbone."}
"""The student backbone of the methods that export their teacher (`which` student)."""
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


def training_checkpoint(path: Path) -> Path | None:
    """The training checkpoint folder `path` stands for: `path` itself when it is one (a
    `checkpoints/step_*` folder, or any holding a `complete` marker or train_state.json) or the
    model.safetensors in one; for a run directory without an exported backbone yet (interrupted,
    or still training), its newest complete checkpoint. None for anything else. A checkpoint
    whose save was cut short (no marker) is refused."""
    if path.is_file():
        inside = path.name == RUN_WEIGHTS and (path.parent / COMPLETE).is_file()
        return path.parent if inside else None
    if not path.is_dir():
        return None
    exported = timm_weights(path) or timm_weights(path / BACKBONE)
    if exported or (path / f"{BACKBONE}.safetensors").is_file():
        return None
    named = _STEP_DIR.match(path.name.removesuffix(".tmp"))
    if named or (path / COMPLETE).is_file() or (path / RUN_STATE).is_file():
        if not (path / COMPLETE).is_file():
            newest = latest_checkpoint(path.parent.parent)
            raise CheckpointError(
                f"{path}: an incomplete checkpoint (no {COMPLETE} marker: its save was cut "
                f"short){f'; the newest complete one is {newest}' if newest else ''}"
            )
        return path
    return latest_checkpoint(path)


def checkpoint_backbone(
    folder: Path, which: str = "teacher"
) -> tuple[dict[str, Tensor], str, dict[str, Any], list[str]]:
    """(backbone state, timm name, kwargs, the state's top-level names) of a run's checkpoint
    folder: the network the run exports (`EXPORTED`: DINO's and DINOv2's teacher, DeiT's student,
    MAE's and the linear probes' backbone; `which` student: DINO's student), built as the run
    built it, from the model section of the folder's own config.json, never inferred."""
    config = read_json(folder / RUN_CONFIG) if (folder / RUN_CONFIG).is_file() else {}
    fields = ModelConfig.__dataclass_fields__
    try:
        method = str(config["method"]["name"])
        model = ModelConfig(**{k: v for k, v in config["model"].items() if k in fields})
        kwargs = model.timm_kwargs()
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{folder / RUN_CONFIG}: no run config naming the method and the model ({e!r}): "
            "not a checkpoint of an ssl_vit run"
        ) from None
    weights = folder / RUN_WEIGHTS
    if not weights.is_file():
        held = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(
            f"{weights}: not found (the checkpoint holds {held}: sharded by FSDP, it has no "
            "single model file; evaluate the run's backbone/ once it has finished)"
        )
    if method not in EXPORTED:
        raise CheckpointError(
            f"{folder}: the backbone of a {method} run is not taken from its checkpoints (known: "
            f"{sorted(EXPORTED)}); take the run's exports once it has finished (resume it with "
            "--train.resume auto)"
        )
    prefix = EXPORTED[method]
    if which == "student":
        if method not in STUDENTS:
            raise CheckpointError(
                f"{folder}: a {method} run has no student network apart from the backbone it "
                "exports (which student: DINO and DINOv2 runs)"
            )
        prefix = STUDENTS[method]
    saved = read_checkpoint(weights)
    state = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    return state, model.name, kwargs, sorted({k.split(".")[0] for k in saved})


def exclude_from_state_dict(module: nn.Module, child: str) -> None:
    """Leave submodule `child` (a frozen teacher, rebuilt from its own file; or None) out of
    `module.state_dict()`, so out of the training checkpoints Accelerate writes, and let
    `module.load_state_dict` take state dicts without it: absent keys keep the child's values.
    Torch's state-dict hooks, so it holds at any prefix (DDP's `module.`) and for any caller."""
    module.register_state_dict_post_hook(functools.partial(_drop_child, child))
    module.register_load_state_dict_pre_hook(functools.partial(_fill_child, child))


def _drop_child(child: str, module: nn.Module, state: dict, prefix: str, _: Any) -> None:
    for key in [k for k in state if k.startswith(f"{prefix}{child}.")]:
        del state[key]


def _fill_child(child: str, module: nn.Module, state: dict, prefix: str, *_: Any) -> None:
    if (sub := getattr(module, child)) is not None:
        for key, value in sub.state_dict(prefix=f"{prefix}{child}.").items():
            state.setdefault(key, value)
