"""Exports: a backbone or classifier in timm's own pretrained layout (a directory of config.json +
model.safetensors, as `timm.models.save_for_hf` writes it), written atomically; and the whole-file
commands over them (`ssl-vit export`, `ssl-vit import`)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
from timm.models import save_for_hf
from torch import nn

from ssl_vit.backbone import Backbone, PosInterp
from ssl_vit.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, field_errors
from ssl_vit.weights.io import CheckpointError, fsync_file, read_checkpoint, shareable
from ssl_vit.weights.load import (
    Pretrained,
    official_interp,
    override,
    read_pretrained,
    select_state,
)
from ssl_vit.weights.paths import (
    BACKBONE,
    CLASSIFIER,
    CLASSIFIER_WEIGHTS,
    POS_INTERP,
    read_spec,
    weights_and_spec,
)

CHECKPOINT_HELP = """--checkpoint: a run directory (its backbone/ export) or a timm pretrained
directory (config.json + model.safetensors, as `ssl-vit export` and timm's save_for_hf write);
an official MAE, DINO, DINOv2 or DeiT .pth (DINOv3: `ssl-vit import` / `export` only, so far); a
timm-named state dict (.pth / .safetensors); or NAME=PATH to name the timm architecture of the
file at PATH (e.g. vit_small_patch16_224.dino=weights.safetensors). Nothing is downloaded."""


@dataclass
class LoadConfig:
    which: Literal["teacher", "student"] = "teacher"
    """Network of a DINO training checkpoint whose backbone is taken."""
    img_size: int = 0
    """Build the backbone for this image size (position embedding resampled by pos_interp); 0
    keeps the checkpoint's."""
    pos_interp: Literal["auto", "bicubic", "offset", "antialias"] = "auto"
    """How the position embedding is resized (backbone.resample_pos_embed), at load and for
    inputs of another size. auto: an official DINOv2 file's own formula (`official_interp`),
    else the official formula of the command's protocol (knn: DINO's offset bicubic; import /
    export: bicubic, as MAE's and DeiT's loaders)."""
    num_heads: int = 0
    """Attention heads; 0 takes them from the checkpoint's JSON or timm name, else from the
    standard ViT size of its width."""

    def model(self) -> ModelConfig:
        """The overrides as load_pretrained's `model` (zero fields keep the checkpoint's)."""
        return ModelConfig(img_size=self.img_size, num_heads=self.num_heads)

    def interp(self, protocol: PosInterp, checkpoint: str | Path) -> PosInterp:
        """pos_interp; for auto, `checkpoint`'s official formula if its format fixes one, else
        `protocol` (the command's)."""
        if self.pos_interp != "auto":
            return self.pos_interp
        return official_interp(checkpoint, self.which) or protocol

    def errors(self) -> list[str]:
        return field_errors(self, "load", {">= 0": "img_size num_heads"})


def save_timm(
    state: dict[str, Any],
    name: str,
    kwargs: dict[str, Any],
    directory: str | Path,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    pos_interp: PosInterp | None = None,
) -> Path:
    """Write `directory` in timm's pretrained layout with timm's own `save_for_hf`: config.json
    (the architecture, its kwargs as `model_args`, the input size and normalisation) and
    model.safetensors, so `timm.create_model("local-dir:DIR", pretrained=True)` builds and loads
    it as it is, and the folder can be pushed to the Hugging Face Hub unchanged. `state` must
    load strictly into `timm.create_model(name, **kwargs)` (CheckpointError otherwise).
    `pos_interp`: the position-embedding formula the weights come with (an official DINOv2
    file's), recorded in config.json (`POS_INTERP`; timm ignores it) for every later load.
    Written as DIR.tmp and renamed into place: a crash leaves the old export or the new one."""
    directory = Path(directory)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
        model.load_state_dict(state, strict=True)  # copied to the CPU model, from any device
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"does not load into timm {name} {kwargs}: {e}") from None
    h, w = model.patch_embed.img_size
    model.pretrained_cfg = {  # what timm's data config reads; no tag or source of timm's own
        "architecture": name,
        "input_size": (3, h, w),
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "mean": tuple(mean),
        "std": tuple(std),
        "num_classes": model.num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    tmp, old = (directory.with_name(directory.name + s) for s in (".tmp", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    extra = {POS_INTERP: pos_interp} if pos_interp else None
    save_for_hf(model, str(tmp), model_config=extra, model_args=kwargs, safe_serialization=True)
    for f in tmp.iterdir():
        shareable(f)  # safetensors writes 0600
        fsync_file(f)
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def export_backbone(
    backbone: Backbone, run_dir: str | Path, pos_interp: PosInterp | None = None
) -> Path:
    """run_dir/backbone/: the backbone as timm's pretrained directory (num_classes 0), with the
    position-embedding formula its weights come with, if any (`save_timm`)."""
    kwargs = {**backbone.timm_kwargs, "num_classes": 0}
    out = Path(run_dir) / BACKBONE
    return save_timm(backbone.state_dict(), backbone.name, kwargs, out, pos_interp=pos_interp)


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    what: str = "auto",
    model: ModelConfig | None = None,
    which: str = "teacher",
    pos_interp: PosInterp | None = None,
) -> dict[str, Any]:
    """Write the directory `output` in timm's pretrained layout (`save_timm`: config.json +
    model.safetensors), which `timm.create_model("local-dir:OUTPUT", pretrained=True)` loads.

    The backbone of any checkpoint load_pretrained takes (num_classes 0), or the classifier of a
    run directory that trained one (`what`: auto | backbone | classifier | backbone_ema |
    classifier_ema, the _ema ones a run's model EMA). Returns what was written."""
    run = Path(checkpoint)
    kind = what
    if what == "auto":
        trained = any((run / f).exists() for f in (CLASSIFIER, CLASSIFIER_WEIGHTS))
        kind = CLASSIFIER if run.is_dir() and trained else BACKBONE
    if kind != BACKBONE and ((model is not None and override({}, model)) or which != "teacher"):
        raise CheckpointError(
            "the load options (image size, heads, which) apply to backbone exports only"
        )
    formula = None
    if kind == BACKBONE:
        pretrained = read_pretrained(checkpoint, model=model, which=which, pos_interp=pos_interp)
        state = network(pretrained).state_dict()
        name, kwargs = pretrained.name, {**pretrained.kwargs, "num_classes": 0}
        formula = official_interp(checkpoint, which)  # travels with the weights
    else:
        if not run.is_dir():
            raise CheckpointError(f"{run}: exporting its {kind} needs a run directory")
        weights, spec = weights_and_spec(run, kind)
        state, _ = select_state(read_checkpoint(weights), None, weights)
        name, kwargs = read_spec(spec)
    out = save_timm(state, name, kwargs, output, pos_interp=formula)
    return {
        "exported": kind,
        "dir": str(out),
        "name": name,
        "kwargs": kwargs,
        "params": sum(t.numel() for t in state.values()),
    }


def import_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    model: ModelConfig | None = None,
    which: str = "teacher",
    overwrite: bool = False,
    pos_interp: PosInterp | None = None,
) -> dict[str, Any]:
    """Write the backbone of any accepted checkpoint as `output_dir`/backbone/ (timm's pretrained
    layout), so that output_dir is a run-like directory every command takes. Returns what was
    written."""
    out = Path(output_dir)
    if (out / BACKBONE).exists() and not overwrite:
        raise CheckpointError(f"{out}: already holds {BACKBONE}/ (overwrite replaces it)")
    pretrained = read_pretrained(checkpoint, model=model, which=which, pos_interp=pos_interp)
    net = network(pretrained)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {**pretrained.kwargs, "num_classes": 0}
    formula = official_interp(checkpoint, which)
    written = save_timm(
        net.state_dict(), pretrained.name, kwargs, out / BACKBONE, pos_interp=formula
    )
    return {
        "imported": str(checkpoint),
        "dir": str(written),
        "name": pretrained.name,
        "kwargs": dict(pretrained.kwargs),
        "params": sum(p.numel() for p in net.parameters()),
    }


def network(pretrained: Pretrained) -> nn.Module:
    """The network a checkpoint's backbone export holds: the Backbone, strictly loaded."""
    return pretrained.backbone()
