"""Weights in and out: any checkpoint users bring to `--checkpoint` -> a Backbone or a timm
classifier (loaded safely and strictly, with the official MAE / DINO / DeiT / DINOv2 key maps),
and our exports in timm's own pretrained layout (a directory of config.json + model.safetensors, as
`timm.models.save_for_hf` writes it), written atomically. Exports of earlier versions
(`backbone.safetensors` + `backbone.json`) are still read.

Run checkpoints (the full training state a run resumes from) are ssl_vit.train.checkpoint's.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import timm
import torch
from safetensors.torch import load_file
from timm.layers import trunc_normal_
from timm.models import get_arch_name, save_for_hf
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

from ssl_vit.backbone import Backbone, PosInterp, resample_pos_embed
from ssl_vit.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, field_errors

log = logging.getLogger("ssl_vit")

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
    "deit": "student.backbone.",
    "linprobe": "backbone.",
    "segprobe": "backbone.",
}
"""Where the backbone a run exports (`Method.export_backbone`: DINO's teacher, DeiT's student)
sits in its checkpoints' model state, by method.name (tests/test_contract.py holds it to every
method's export_backbone()). Not fine-tuning: its config does not rebuild the backbone its
classifier reshaped (global_pool)."""
STUDENTS = {"dino": "backbone.", "dinov2": "backbone."}
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
        _fsync_file(f)
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def timm_weights(path: Path) -> Path | None:
    """The weights file of a directory in timm's pretrained layout (config.json naming an
    architecture; model.safetensors, else pytorch_model.bin, as timm prefers): our exports, a
    `save_for_hf` folder, a Hub download. None for any other path."""
    config = path / TIMM_CONFIG
    if not (config.is_file() and "architecture" in _json(config)):
        return None
    return next((f for f in (path / TIMM_WEIGHTS, path / TIMM_WEIGHTS_BIN) if f.is_file()), None)


def _json(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return spec if isinstance(spec, dict) else {}


def export_backbone(
    backbone: Backbone, run_dir: str | Path, pos_interp: PosInterp | None = None
) -> Path:
    """run_dir/backbone/: the backbone as timm's pretrained directory (num_classes 0), with the
    position-embedding formula its weights come with, if any (`save_timm`)."""
    kwargs = {**backbone.timm_kwargs, "num_classes": 0}
    out = Path(run_dir) / BACKBONE
    return save_timm(backbone.state_dict(), backbone.name, kwargs, out, pos_interp=pos_interp)


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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Import: any checkpoint users bring to `--checkpoint` -> a Backbone, loaded safely and strictly.


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and says why."""


WHICH = ("teacher", "student")
_WRAPPERS = ("module.", "backbone.")
_DROPPED = re.compile(r"^(head|head_dist|dino_head|ibot_head)\.|^mask_token$|^decoder_")
"""Method state that is not the backbone: classifier / DINO / DINOv2 / distillation heads, the MAE
and DINOv2 mask tokens, MAE's decoder. A DeiT distillation token is kept: it is part of the
network the distilled model's features come from (the backbone is then timm's deit_*_distilled)."""
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
"""A DINOv2 block under FSDP chunking (block_chunks > 0): `blocks.{chunk}.{i}.`, i global."""
_SWIGLU = re.compile(r"^blocks\.\d+\.mlp\.w(12|3)\.")
"""DINOv2's SwiGLU feed-forward (ffn_layer swiglufused: ViT-g/14 and the vitl14/vitg14 training
configs), which is not timm's Mlp."""
_DINOV2_SIZES = {384: "small", 768: "base", 1024: "large"}
"""Width -> timm's DINOv2 size name (vit_{size}_patch14[_reg4]_dinov2)."""
_STANDARD_VITS = {
    192: ("tiny", 3),
    384: ("small", 6),
    768: ("base", 12),
    1024: ("large", 16),
    1280: ("huge", 16),
}
"""Width -> (timm size name, attention heads) of the standard ViT sizes (Ti, S, B, L, H)."""


def load_pretrained(
    checkpoint: str | Path,
    *,
    model: ModelConfig | None = None,
    which: str = "teacher",
    pos_interp: PosInterp | None = None,
) -> Backbone:
    """The Backbone held by any checkpoint `--checkpoint` accepts.

    checkpoint: our run directory (its backbone/ export; before it has one, interrupted or still
    training, its newest complete checkpoint, logged), one of its checkpoint folders
    (`checkpoint_backbone`: the network the run exports, built from the folder's own config.json);
    a timm pretrained directory (model.safetensors or pytorch_model.bin); a `.safetensors` with
    its JSON beside (`backbone.json` for `backbone.safetensors`; `<stem>.json` holding {"name",
    "kwargs"} for an export); an official MAE (pretrain, `_full`, visualize, training), DINO
    (`_pretrain` backbone, full training), DeiT (plain or distilled) or DINOv2
    (`dinov2_vit{s,b,l}14[_reg4]_pretrain.pth`, a training `teacher_checkpoint.pth`) `.pth`;
    any timm-named ViT state dict (.pth or .safetensors). `NAME=PATH` names the timm
    architecture of the file at PATH (e.g. `vit_small_patch16_224.dino=weights.safetensors`; a
    tag after the dot is ignored); NAME is built at its own image size unless `model` gives one.
    Nothing is downloaded.

    Architecture: from the JSON for our files, from NAME when given, else inferred from the
    tensor shapes (width, depth, patch, grid, MLP ratio, qkv bias; heads from the standard ViT
    sizes Ti/S/B/L/H; a `dist_token` makes it timm's DeiT distilled ViT; layer scale or
    registers timm's DINOv2 ViT). Every non-zero field of `model` but `name` (img_size,
    patch_size, embed_dim, depth, num_heads, drop_path) overrides it; the position embedding is
    resampled with `pos_interp` when the grid changes (backbone.resample_pos_embed; the returned
    backbone resizes it the same way for inputs of another size). None: the formula an export
    recorded with its weights, or the official DINOv2 formula for its files (`official_interp`),
    else bicubic without antialiasing, as the official MAE and DeiT loaders.

    Key mapping, then strict loading: the state dict is `model` (MAE, DeiT), `teacher` or
    `student` (`which`; DINO training checkpoints) or `state_dict` of the file, else the file
    itself; `module.` and `backbone.` prefixes are stripped; the official DINOv2 layout is
    converted (`dinov2_keys`: registers, chunked blocks); dropped: `head.*`, `head_dist.*`,
    `dino_head.*`, `ibot_head.*` (classifier, DINO, DINOv2 and distillation heads),
    `mask_token` (MAE, DINOv2), `decoder_*` (MAE decoder). A DeiT
    distillation token stays, with its position: features are those of the distilled network.
    Every other key must match the backbone exactly, or CheckpointError lists the missing,
    unexpected and mis-shaped keys.

    Loading is safe: `torch.load(weights_only=True)`, allowing only argparse.Namespace (the
    `args` of official training checkpoints) beyond tensors and plain containers; a file holding
    any other pickled object is refused without being unpickled.
    """
    if which not in WHICH:
        raise CheckpointError(f"which: expected one of {list(WHICH)}, got {which!r}")
    path, arch = parse_checkpoint(checkpoint)
    if arch is None and (folder := training_checkpoint(path)) is not None:
        if folder != path and path.is_dir():
            log.warning(
                "%s has no %s/ yet (interrupted, or still training): using its newest complete "
                "checkpoint, %s",
                path,
                BACKBONE,
                folder,
            )
        path = folder / RUN_WEIGHTS
        state, name, kwargs, top_keys = checkpoint_backbone(folder, which)
        pos_interp = pos_interp or "bicubic"
    else:
        path, spec_file = weights_and_spec(path)
        obj = read_checkpoint(path)
        state, top_keys = _select_state(obj, which, path)
        formula = recorded_interp(spec_file) or _dinov2_interp(unwrapped(state))
        pos_interp = pos_interp or formula or "bicubic"
        name, kwargs, state = _file_backbone(path, arch, spec_file, state, top_keys, model)
    if model is not None:
        kwargs = _override(kwargs, model)
    try:
        backbone = Backbone(name, pos_interp=pos_interp, **kwargs)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot build the ViT {name} {kwargs}: {e}") from None
    state = resample_to_grid(state, backbone)
    # timm's own loader: patch-embed layout (its pos-embed resampling finds nothing left to do)
    state = checkpoint_filter_fn(state, backbone)
    load_strict(backbone, state, path, top_keys)
    return backbone


def _file_backbone(
    path: Path,
    arch: str | None,
    spec_file: Path | None,
    state: dict[str, Tensor],
    top_keys: list[str],
    model: ModelConfig | None,
) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """(timm name, kwargs, backbone state in timm's names) of a weights file's state: the
    architecture as given (NAME=PATH), from its JSON, else inferred from the shapes."""
    try:
        state = backbone_keys(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if arch is not None:
        return architecture(arch), {}, state
    if spec_file is not None and spec_file.is_file():
        name, kwargs = _read_spec(spec_file)
        kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
        return architecture(name), kwargs, state
    try:
        name, kwargs = infer_architecture(state, model.num_heads if model else 0)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}; the file's top-level keys: {top_keys[:20]}") from None
    return name, kwargs, state


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
    config = _json(folder / RUN_CONFIG) if (folder / RUN_CONFIG).is_file() else {}
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


def resample_to_grid(state: dict[str, Tensor], backbone: Backbone) -> dict[str, Tensor]:
    """`state` with its (square-grid) `pos_embed` resized to the backbone's patch grid by the
    backbone's own `pos_interp` formula."""
    pos = state.get("pos_embed")
    if pos is None or backbone.pos_embed is None or pos.shape == backbone.pos_embed.shape:
        return state
    n = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
    side = math.isqrt(pos.shape[1] - n)
    if side * side != pos.shape[1] - n:
        return state  # not a square grid: strict loading reports the mismatch
    grid = backbone.grid_size
    return state | {
        "pos_embed": resample_pos_embed(pos, grid, (side, side), n, backbone.pos_interp)
    }


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


class UnsafeCheckpointError(CheckpointError):
    """A file that pickles an object which could run code when loaded; nothing in it was run."""

    def __init__(self, path: Path, name: str, plain: str, advice: str = ""):
        super().__init__(
            f"{path}: refused: it holds a pickled object ({name}) other than {plain}, which "
            f"could run code when loaded; nothing in it was run. {advice}".strip()
        )


def backbone_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Timm backbone names: `module.`/`backbone.` prefixes stripped, the official DINOv2 layout
    converted (`dinov2_keys`), method state dropped (`_DROPPED`)."""
    out = unwrapped(state)
    if official_dinov2(out):
        out = dinov2_keys(out)
    return {k: v for k, v in out.items() if not _DROPPED.search(k)}


def unwrapped(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with its `module.` / `backbone.` wrapper prefixes stripped."""
    out = {}
    for key, value in state.items():
        while key.startswith(_WRAPPERS):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def official_dinov2(state: dict[str, Tensor]) -> bool:
    """Whether an unwrapped state dict is in the official DINOv2 layout
    (dinov2/models/vision_transformer.py): `register_tokens`, or its (1, D) mask token (MAE's is
    (1, 1, D); timm's DINOv2 ViTs have none)."""
    mask_token = state.get("mask_token")
    return "register_tokens" in state or (mask_token is not None and mask_token.ndim == 2)


def dinov2_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official DINOv2 backbone (a released `dinov2_vit*14[_reg4]_pretrain.pth`, or the
    `backbone.*` of a training `teacher_checkpoint.pth`, unwrapped) in timm's names, as timm's own
    `_convert_dinov2`: chunked blocks `blocks.{c}.{i}.*` -> `blocks.{i}.*`; with registers,
    `register_tokens` (1, R, D) -> `reg_token`, and since timm's registered DINOv2 ViT keeps no
    prefix positions (no_embed_class) the cls position pos_embed[:, :1] is added into `cls_token`
    (the official forward adds it to the cls token alone) and pos_embed (1, 1 + N, D) keeps its
    N patch positions. Layer scale (`ls1.gamma`, `ls2.gamma`), attention, MLP and norms already
    carry timm's names. A SwiGLU feed-forward (`mlp.w12`, `mlp.w3`) is refused."""
    if swiglu := next((k for k in state if _SWIGLU.match(k)), None):
        raise CheckpointError(
            f"{swiglu}: a DINOv2 SwiGLU feed-forward (ViT-g/14, ffn_layer swiglufused) is not "
            "supported; only the MLP of ViT-S/B/L/14 (blocks.*.mlp.fc1, fc2)"
        )
    out = {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state.items()}
    if "register_tokens" in out:
        pos = out["pos_embed"]
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def official_interp(checkpoint: str | Path, which: str = "teacher") -> PosInterp | None:
    """The position-embedding formula the official code of `checkpoint`'s format fixes for every
    protocol, or None when the command's protocol decides (MAE, DINO, DeiT, timm, ours): for an
    official DINOv2 file, that of its model (dinov2/configs/eval/*.yaml, hub/backbones.py):
    without registers interpolate_offset 0.1, no antialiasing ('offset', DINO's); with registers
    offset 0 and antialiasing, F.interpolate(size, bicubic, antialias=True) ('antialias',
    timm's). For an export of such a file (`ssl-vit import` / `export`), the formula its
    config.json recorded (`recorded_interp`)."""
    path, _ = parse_checkpoint(checkpoint)
    if training_checkpoint(path) is not None:
        return None
    weights, spec = weights_and_spec(path)
    if spec is not None and spec.is_file():
        return recorded_interp(spec)
    state, _ = _select_state(read_checkpoint(weights), which, weights)
    return _dinov2_interp(unwrapped(state))


def recorded_interp(spec: Path | None) -> PosInterp | None:
    """The position-embedding formula an export's JSON recorded with its weights (`POS_INTERP`,
    written by `save_timm`), or None when it names none."""
    if spec is None or not spec.is_file():
        return None
    formula = _json(spec).get(POS_INTERP)
    if formula is not None and formula not in get_args(PosInterp):
        raise CheckpointError(
            f"{spec}: {POS_INTERP} {formula!r} is none of {list(get_args(PosInterp))}"
        )
    return formula


def _dinov2_interp(state: dict[str, Tensor]) -> PosInterp | None:
    if not official_dinov2(state):
        return None
    return "antialias" if "register_tokens" in state else "offset"


def distilled_name(name: str) -> str:
    """timm's DeiT distilled ViT of the size in a ViT name (built with explicit sizes)."""
    size = re.search(r"(tiny|small|base)", name)
    return f"deit_{size[1] if size else 'base'}_distilled_patch16_224"


@torch.no_grad()
def distilled_backbone(backbone: Backbone) -> Backbone:
    """`backbone` as timm's DeiT distilled ViT (`distilled_name`, its sizes and kwargs): its
    weights, plus a distillation token after cls with its own position embedding, each drawn
    trunc_normal(std 0.02) as DeiT's models.py; the forward then runs cls, dist, patches."""
    if backbone.num_prefix_tokens != 1 or backbone.no_embed_class:
        raise ValueError("distillation needs a ViT with a cls token only, in pos_embed")
    kwargs = backbone.timm_kwargs | {
        k: getattr(backbone, k) for k in ("patch_size", "embed_dim", "depth", "num_heads")
    }
    kwargs["img_size"] = backbone.grid_size[0] * backbone.patch_size
    out = Backbone(distilled_name(backbone.name), pos_interp=backbone.pos_interp, **kwargs)
    state, dim = backbone.state_dict(), backbone.embed_dim
    dist_token, dist_pos = (trunc_normal_(torch.zeros(1, 1, dim), std=0.02) for _ in range(2))
    pos = state["pos_embed"].cpu()
    state |= {
        "dist_token": dist_token,
        "pos_embed": torch.cat([pos[:, :1], dist_pos, pos[:, 1:]], 1),
    }
    out.load_state_dict(state)
    return out.to(next(backbone.parameters()).device)


def classifier_keys(
    backbone: Backbone, head: nn.Module, num_classes: int, head_dist: nn.Module | None = None
) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    """(state dict, timm name, kwargs) of a ViT classifier that `timm.create_model(name, **kwargs)`
    loads strictly: the backbone's ViT with `head`, and `head_dist` on a distilled backbone's
    distillation token (timm's deit_*_distilled: the prediction is the mean of the two)."""
    state = backbone.state_dict() | {f"head.{k}": v for k, v in head.state_dict().items()}
    if head_dist is not None:
        state |= {f"head_dist.{k}": v for k, v in head_dist.state_dict().items()}
    return state, backbone.name, {**backbone.timm_kwargs, "num_classes": num_classes}


def infer_architecture(state: dict[str, Tensor], num_heads: int = 0) -> tuple[str, dict[str, Any]]:
    """(timm name, kwargs) of the cls-token ViT a timm-named state dict holds, from its shapes;
    with a `dist_token`, timm's DeiT distilled ViT (its pos_embed: cls, dist, patches); with
    layer scale (`blocks.0.ls1.gamma`) or registers (`reg_token` (1, R, D)), timm's DINOv2 ViT
    (`vit_{size}_patch14[_reg4]_dinov2`, sized by the kwargs; pos_embed with or without the cls
    position: no_embed_class).

    Heads are not in the shapes: `num_heads`, else the standard ViT size of that width.
    """
    patch = state.get("patch_embed.proj.weight")
    pos = state.get("pos_embed")
    blocks = {int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if patch is None or patch.ndim != 4 or pos is None or "cls_token" not in state or not blocks:
        raise CheckpointError(
            "cannot infer a ViT architecture: no cls_token, pos_embed, 4-d "
            "patch_embed.proj.weight and blocks.* keys (name it with NAME=PATH)"
        )
    dim, in_chans, p = patch.shape[0], patch.shape[1], patch.shape[-1]
    reg = state.get("reg_token")
    layer_scale = "blocks.0.ls1.gamma" in state
    dinov2 = layer_scale or reg is not None
    prefix = 2 if "dist_token" in state else 1
    if dinov2 and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        prefix = 0  # timm's registered DINOv2 layout: the cls position is in cls_token
    grid = math.isqrt(pos.shape[1] - prefix)
    if grid * grid != pos.shape[1] - prefix:
        raise CheckpointError(
            f"pos_embed {tuple(pos.shape)} is not {prefix} prefix token(s) + a square patch grid"
        )
    size, heads = _STANDARD_VITS.get(dim, ("base", 0))
    heads = num_heads or heads
    if not heads:
        raise CheckpointError(
            f"width {dim} is no standard ViT size ({sorted(_STANDARD_VITS)}): give the number "
            "of attention heads (--model.num_heads / --load.num_heads)"
        )
    name = f"vit_{size}_patch{p}_224"
    kwargs: dict[str, Any] = dict(
        img_size=grid * p, patch_size=p, embed_dim=dim, depth=max(blocks) + 1, num_heads=heads
    )
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.shape[0] != 4 * dim:
        kwargs["mlp_ratio"] = fc1.shape[0] / dim
    if "blocks.0.attn.qkv.bias" not in state:
        kwargs["qkv_bias"] = False
    if in_chans != 3:
        kwargs["in_chans"] = in_chans
    if dinov2:
        return _dinov2_name(dim, reg), kwargs | _dinov2_kwargs(reg, prefix, layer_scale)
    name = name if timm.is_model(name) else "vit_base_patch16_224"
    return (distilled_name(name) if prefix == 2 else name), kwargs


def _dinov2_name(dim: int, reg: Tensor | None) -> str:
    """timm's DINOv2 ViT of width `dim` (base for another width: the kwargs size it)."""
    return f"vit_{_DINOV2_SIZES.get(dim, 'base')}_patch14_{'' if reg is None else 'reg4_'}dinov2"


def _dinov2_kwargs(reg: Tensor | None, prefix: int, layer_scale: bool) -> dict[str, Any]:
    """What differs from `_dinov2_name`'s defaults (4 registers and no cls position with
    registers, a cls position without; layer scale)."""
    registers = 0 if reg is None else reg.shape[1]
    kwargs: dict[str, Any] = {} if registers in (0, 4) else {"reg_tokens": registers}
    if (prefix == 0) != (registers > 0):
        kwargs["no_embed_class"] = prefix == 0
    if not layer_scale:
        kwargs["init_values"] = None
    return kwargs


def load_strict(
    backbone: Backbone, state: dict[str, Tensor], source: Path | str, top_keys: list[str]
) -> None:
    """load_state_dict(strict=True), after one error listing every mismatch (first 20 each)."""
    if mismatches := _mismatches(backbone.state_dict(), state):
        raise CheckpointError(
            f"{source}: does not fit {backbone.name} {backbone.timm_kwargs} (after the key "
            "mapping: module./backbone. prefixes stripped; heads, mask/dist tokens and decoder "
            f"dropped){mismatches}\n  the file's top-level keys: {top_keys[:20]}"
        )
    backbone.load_state_dict(state, strict=True)


def _mismatches(want: dict[str, Tensor], state: dict[str, Tensor]) -> str:
    """'' when `state` has exactly the keys and shapes of `want`, else the missing, unexpected
    and mis-shaped keys (first 20 of each), one per line."""
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    misshaped = [k for k in want if k in state and state[k].shape != want[k].shape]
    if not (missing or unexpected or misshaped):
        return ""

    def listing(title: str, keys: list[str], describe: Any) -> str:
        more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
        lines = "".join(f"\n    {k} {describe(k)}" for k in keys[:20])
        return f"\n  {title} ({len(keys)}):{lines}{more}"

    def shape(t: Tensor) -> tuple[int, ...]:
        return tuple(t.shape)

    return (
        listing("missing", missing, lambda k: shape(want[k]))
        + listing("unexpected", unexpected, lambda k: shape(state[k]))
        + listing(
            "mis-shaped",
            misshaped,
            lambda k: f"checkpoint {shape(state[k])} vs model {shape(want[k])}",
        )
    )


def _select_state(obj: Any, which: str | None, path: Path) -> tuple[dict[str, Tensor], list[str]]:
    """(the state dict holding the model: `which`, `model` or `state_dict` of the file, else the
    file itself; the file's top-level keys)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    top_keys = [str(k) for k in obj]
    if which is not None and which in obj:
        state = obj[which]
    elif which == "student":
        raise CheckpointError(
            f"{path}: no 'student' network (a DINO training checkpoint has one); "
            f"the file's top-level keys: {top_keys[:20]}"
        )
    elif "model" in obj:
        state = obj["model"]
    elif "state_dict" in obj:
        state = obj["state_dict"]
    else:
        state = obj
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: no state dict (a dict of tensors) found; the file's top-level keys: "
            f"{top_keys[:20]}"
        )
    return state, top_keys


def _read_spec(path: Path) -> tuple[str, dict[str, Any]]:
    """(timm name, timm kwargs) of a timm config.json (`architecture`, `model_args`), or of an
    earlier version's backbone.json / classifier.json / export JSON (`name`, `kwargs`)."""
    spec = _json(path)
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


def _override(kwargs: dict[str, Any], model: ModelConfig) -> dict[str, Any]:
    """kwargs with every non-zero architecture field of `model` (not its name) put in."""
    kwargs = dict(kwargs)
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(model, key):
            kwargs[key] = getattr(model, key)
    if model.drop_path:
        kwargs["drop_path_rate"] = model.drop_path
    return kwargs


def load_classifier(
    checkpoint: str | Path, name: str = "", num_classes: int | None = None
) -> nn.Module:
    """A timm classifier, in eval mode, loaded safely (as load_pretrained) and strictly.

    checkpoint: an ssl_vit run directory or its `classifier.safetensors` (any `.safetensors`
    whose `<stem>.json` beside it names the timm model and kwargs: an ssl_vit export);
    `NAME=PATH`, timm model NAME (a tag after the dot is ignored) from the state-dict file at
    PATH; else a state-dict file for the timm model `name`. The state dict is the file's `model`
    or `state_dict` entry (official DeiT / timm training files), else the file itself. A
    timm-named model is built with `num_classes` classes when given; an exported one must have
    that many. Nothing is downloaded.
    """
    path, arch = parse_checkpoint(checkpoint)
    path, spec = weights_and_spec(path, CLASSIFIER)
    if arch is None and spec is not None and spec.is_file():
        name, kwargs = _read_spec(spec)
    elif arch or name:
        name = get_arch_name(arch or name)  # a pretrained tag is ignored: nothing is downloaded
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
    else:
        raise CheckpointError(f"{path}: no JSON naming its model beside it: give it as NAME=PATH")
    state, top_keys = _select_state(read_checkpoint(path), None, path)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot build the timm model {name} {kwargs}: {e}") from None
    if mismatches := _mismatches(model.state_dict(), state):
        raise CheckpointError(
            f"{path}: does not fit timm {name} {kwargs}{mismatches}\n  the file's top-level "
            f"keys: {top_keys[:20]}"
        )
    model.load_state_dict(state)
    if num_classes is not None and model.num_classes != num_classes:
        raise CheckpointError(
            f"{path}: a classifier of {model.num_classes} classes, not {num_classes}"
        )
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Export and import of whole files (`ssl-vit export`, `ssl-vit import`).

CHECKPOINT_HELP = """--checkpoint: a run directory (its backbone/ export) or a timm pretrained
directory (config.json + model.safetensors, as `ssl-vit export` and timm's save_for_hf write);
an official MAE, DINO, DINOv2 or DeiT .pth; a timm-named state dict (.pth / .safetensors); or
NAME=PATH to name the timm architecture of the file at PATH (e.g.
vit_small_patch16_224.dino=weights.safetensors). Nothing is downloaded."""


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
    if kind != BACKBONE and ((model is not None and _override({}, model)) or which != "teacher"):
        raise CheckpointError(
            "the load options (image size, heads, which) apply to backbone exports only"
        )
    formula = None
    if kind == BACKBONE:
        backbone = load_pretrained(checkpoint, model=model, which=which, pos_interp=pos_interp)
        state = backbone.state_dict()
        name, kwargs = backbone.name, {**backbone.timm_kwargs, "num_classes": 0}
        formula = official_interp(checkpoint, which)  # travels with the weights
    else:
        if not run.is_dir():
            raise CheckpointError(f"{run}: exporting its {kind} needs a run directory")
        weights, spec = weights_and_spec(run, kind)
        state, _ = _select_state(read_checkpoint(weights), None, weights)
        name, kwargs = _read_spec(spec)
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
    backbone = load_pretrained(checkpoint, model=model, which=which, pos_interp=pos_interp)
    out.mkdir(parents=True, exist_ok=True)
    written = export_backbone(backbone, out, official_interp(checkpoint, which))
    return {
        "imported": str(checkpoint),
        "dir": str(written),
        **backbone.config_dict(),
        "params": sum(p.numel() for p in backbone.parameters()),
    }
