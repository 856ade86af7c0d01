"""What a `--checkpoint` value names: the files of timm's pretrained layout and of earlier exports,
`NAME=PATH`, and the architecture and position-embedding formula a directory's JSON records."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import timm
from timm.models import get_arch_name

from ssl_vit.backbone import PosInterp
from ssl_vit.weights.io import CheckpointError, read_json

BACKBONE = "backbone"
"""A run directory's exported backbone: a timm pretrained directory (`save_timm`)."""
CLASSIFIER = "classifier"
TIMM_CONFIG, TIMM_WEIGHTS = "config.json", "model.safetensors"
"""The files of timm's pretrained layout (save_for_hf, the Hugging Face Hub)."""
TIMM_WEIGHTS_BIN = "pytorch_model.bin"
"""timm's other weights file (save_for_hf's default, many Hub repositories): a torch.save'd state
dict, read with weights_only=True as timm reads it."""
POS_INTERP = "pos_interp"
"""The key of an export's config.json recording the position-embedding formula its weights come
with (an official DINOv2 file's), used whenever they are loaded at another size."""
BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_CONFIG = "backbone.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
"""The files of earlier versions' exports, still read."""


def timm_weights(path: Path) -> Path | None:
    """The weights file of a directory in timm's pretrained layout (config.json naming an
    architecture; model.safetensors, else pytorch_model.bin, as timm prefers): our exports, a
    `save_for_hf` folder, a Hub download. None for any other path."""
    config = path / TIMM_CONFIG
    if not (config.is_file() and "architecture" in read_json(config)):
        return None
    return next((f for f in (path / TIMM_WEIGHTS, path / TIMM_WEIGHTS_BIN) if f.is_file()), None)


def weights_and_spec(path: Path, stem: str = BACKBONE) -> tuple[Path, Path | None]:
    """(weights file, the JSON naming its architecture, if any) of a path `--checkpoint` names:
    a timm pretrained directory; a run directory (its `stem`/ export, or an earlier version's
    `stem`.safetensors + .json); the weights file of a timm directory; a `.safetensors` with
    its `<stem>.json` beside; any other file (no JSON)."""
    if path.is_dir():
        for candidate in (path, path / stem):
            if (weights := timm_weights(candidate)) is not None:
                return weights, candidate / TIMM_CONFIG
        weights = path / f"{stem}.safetensors"
        if not weights.is_file():
            raise CheckpointError(
                f"{path}: a directory without {stem}/ and without complete checkpoints (a run "
                f"directory has {stem}/ once training has finished, checkpoints/step_*/ before; "
                f"a timm directory holds {TIMM_CONFIG} and {TIMM_WEIGHTS} or {TIMM_WEIGHTS_BIN})"
            )
        if not weights.with_suffix(".json").is_file():
            raise CheckpointError(
                f"{weights.with_suffix('.json')}: not found (written beside {weights})"
            )
        return weights, weights.with_suffix(".json")
    if path.name in (TIMM_WEIGHTS, TIMM_WEIGHTS_BIN) and timm_weights(path.parent) is not None:
        return path, path.parent / TIMM_CONFIG
    if path.suffix != ".safetensors":
        return path, None
    return path, path.with_suffix(".json")


def parse_checkpoint(checkpoint: str | Path) -> tuple[Path, str | None]:
    """(path, timm model name as given or None) of a `--checkpoint` value: a path, or NAME=PATH."""
    text = str(checkpoint)
    if Path(text).exists():
        return Path(text), None
    name, eq, file = text.partition("=")
    if eq and timm.is_model(name):
        if not Path(file).exists():
            raise CheckpointError(f"{file}: not found (the weights file of {text!r})")
        return Path(file), name
    if timm.is_model(text):
        raise CheckpointError(
            f"{text!r} is a timm model name: give its weights file as {text}=PATH "
            "(nothing is downloaded)"
        )
    raise CheckpointError(
        f"{text}: not found (expected a run directory, a checkpoint file or NAME=PATH)"
    )


def architecture(name: str) -> str:
    """The timm architecture a backbone of `name` is built as: the name without a pretrained
    tag (a DeiT distilled name stays distilled: its token is part of the network)."""
    return get_arch_name(name)


def read_spec(path: Path) -> tuple[str, dict[str, Any]]:
    """(timm name, timm kwargs) of a timm config.json (`architecture`, `model_args`), or of an
    earlier version's backbone.json / classifier.json / export JSON (`name`, `kwargs`)."""
    spec = read_json(path)
    try:
        if "architecture" in spec:  # newer timm also records the factory's own arguments
            kwargs = dict(spec.get("model_args") or {})
            kwargs.setdefault("num_classes", spec.get("num_classes", 0))
            size = kwargs.get("img_size")
            if isinstance(size, list) and len(set(size)) == 1:  # JSON's [h, w] of a square
                kwargs["img_size"] = size[0]
            return str(spec["architecture"]), kwargs
        return str(spec["name"]), dict(spec["kwargs"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: names no timm architecture ({e})") from None


def recorded_interp(spec: Path | None) -> PosInterp | None:
    """The position-embedding formula an export's JSON recorded with its weights (`POS_INTERP`,
    written by `save_timm`), or None when it names none."""
    if spec is None or not spec.is_file():
        return None
    formula = read_json(spec).get(POS_INTERP)
    if formula is not None and formula not in get_args(PosInterp):
        raise CheckpointError(
            f"{spec}: {POS_INTERP} {formula!r} is none of {list(get_args(PosInterp))}"
        )
    return formula
