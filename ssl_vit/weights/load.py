"""Import: any checkpoint users bring to `--checkpoint` -> a Backbone (or a timm classifier),
loaded safely and strictly, through the key map of its family (FAMILIES)."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_arch_name, is_model_in_modules
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

import ssl_vit.weights.deit as deit
import ssl_vit.weights.dino as dino
import ssl_vit.weights.dinov2 as dinov2
import ssl_vit.weights.dinov3 as dinov3
import ssl_vit.weights.mae as mae
import ssl_vit.weights.timm_vit as timm_vit
from ssl_vit.backbone import Backbone, PosInterp, resample_pos_embed
from ssl_vit.config import ModelConfig
from ssl_vit.weights.family import Family, unwrapped
from ssl_vit.weights.io import CheckpointError, read_checkpoint
from ssl_vit.weights.paths import (
    BACKBONE,
    CLASSIFIER,
    architecture,
    parse_checkpoint,
    read_spec,
    recorded_interp,
    weights_and_spec,
)
from ssl_vit.weights.run import RUN_WEIGHTS, checkpoint_backbone, training_checkpoint
from ssl_vit.weights.timm_vit import infer_architecture

log = logging.getLogger("ssl_vit")

FAMILIES: tuple[Family, ...] = (
    mae.FAMILY,
    dino.FAMILY,
    deit.FAMILY,
    dinov3.FAMILY,
    dinov2.FAMILY,
    timm_vit.FAMILY,
)
"""The official checkpoint families, one module each: a new family is one file and one line here.
A file in a family's own layout (`Family.detect`) is converted by the first that claims it: DINOv3
before DINOv2, whose (1, D) mask token its files hold too."""
DROPPED = re.compile("|".join(f.dropped for f in FAMILIES if f.dropped))
"""Method state that is not the backbone, every family's: classifier / DINO / DINOv2 /
distillation heads, the MAE and DINOv2 mask tokens, MAE's decoder. A DeiT distillation token is
kept: it is part of the network the distilled model's features come from (the backbone is then
timm's deit_*_distilled)."""
WHICH = ("teacher", "student")


def official_family(state: dict[str, Tensor]) -> Family | None:
    """The family whose own (non-timm) layout an unwrapped state dict is in, if any."""
    return next((f for f in FAMILIES if f.detect is not None and f.detect(state)), None)


def official_formula(state: dict[str, Tensor]) -> PosInterp | None:
    """The position-embedding formula the official code of an unwrapped state's family fixes."""
    family = official_family(state)
    return family.interp(state) if family is not None and family.interp is not None else None


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
    itself; `module.` and `backbone.` prefixes are stripped; an official layout is converted by
    its family (`FAMILIES`: DINOv2's registers and chunked blocks, `dinov2_keys`; DINOv3's,
    `dinov3_keys`); dropped: `head.*`, `head_dist.*`,
    `dino_head.*`, `ibot_head.*` (classifier, DINO, DINOv2 and distillation heads),
    `mask_token` (MAE, DINOv2), `decoder_*` (MAE decoder). A DeiT
    distillation token stays, with its position: features are those of the distilled network.
    Every other key must match the backbone exactly, or CheckpointError lists the missing,
    unexpected and mis-shaped keys.

    An official DINOv3 file (`dinov3_vit*16_pretrain_*.pth`, a training checkpoint's teacher)
    gives timm's DINOv3 Eva (`vit_*_patch16_dinov3[_qkvb]`, its architecture read from the file:
    `dinov3.infer_dinov3`), adapted by the Backbone like a VisionTransformer: RoPE, nothing to
    resample; its `rope_embed.periods` must equal timm's.

    Loading is safe: `torch.load(weights_only=True)`, allowing only argparse.Namespace (the
    `args` of official training checkpoints) beyond tensors and plain containers; a file holding
    any other pickled object is refused without being unpickled.
    """
    return read_pretrained(checkpoint, model=model, which=which, pos_interp=pos_interp).backbone()


@dataclass
class Pretrained:
    """A checkpoint read and mapped to timm's names, not yet loaded into a network: what
    load_pretrained (a Backbone), load_timm (any timm model) and the exports build from."""

    path: Path
    """The weights file (a run's checkpoint: its model.safetensors)."""
    name: str
    """The timm architecture (no pretrained tag)."""
    kwargs: dict[str, Any]
    """timm.create_model's keyword arguments (num_classes excluded: 0)."""
    state: dict[str, Tensor]
    """The network's state in timm's names."""
    top_keys: list[str]
    """The file's top-level keys, for messages."""
    pos_interp: PosInterp
    """The position-embedding formula (a Backbone's, for resizing)."""

    @property
    def vit(self) -> bool:
        """Whether this is timm's VisionTransformer family (a position table to resample, timm's
        ViT checkpoint_filter_fn for its patch-embedding layout), not an Eva (DINOv3's RoPE
        models: nothing to resample, no filter)."""
        return not is_model_in_modules(self.name, ["eva"])

    def backbone(self) -> Backbone:
        """The Backbone, loaded strictly, the position embedding resampled to its grid; any
        buffer the file carries that timm computes (DINOv3's `rope.periods`) checked equal and
        dropped (`check_buffers`)."""
        try:
            backbone = Backbone(self.name, pos_interp=self.pos_interp, **self.kwargs)
        except Exception as e:
            raise CheckpointError(
                f"{self.path}: cannot build the ViT {self.name} {self.kwargs}: {e}"
            ) from None
        state = check_buffers(self.state, backbone, self.path)
        if self.vit:
            state = resample_to_grid(state, backbone)
            # timm's own loader: patch-embed layout (its pos-embed resampling finds nothing left)
            state = checkpoint_filter_fn(state, backbone)
        load_strict(backbone, state, self.path, self.top_keys)
        return backbone

    def timm_model(self) -> nn.Module:
        """timm.create_model(name, num_classes=0, **kwargs), eval mode, loaded strictly: the
        Backbone's own network."""
        return self.backbone().to_timm().eval()


def read_pretrained(
    checkpoint: str | Path,
    *,
    model: ModelConfig | None = None,
    which: str = "teacher",
    pos_interp: PosInterp | None = None,
) -> Pretrained:
    """Any checkpoint `--checkpoint` accepts, read and mapped (load_pretrained says how)."""
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
        state, top_keys = select_state(obj, which, path)
        formula = recorded_interp(spec_file) or official_formula(unwrapped(state))
        pos_interp = pos_interp or formula or "bicubic"
        name, kwargs, state = _file_backbone(path, arch, spec_file, state, top_keys, model)
    if model is not None:
        kwargs = override(kwargs, model)
    return Pretrained(path, name, kwargs, state, top_keys, pos_interp)


def load_timm(
    checkpoint: str | Path, *, model: ModelConfig | None = None, which: str = "teacher"
) -> nn.Module:
    """The timm model (num_classes 0, eval mode) held by any checkpoint load_pretrained takes,
    DINOv3's RoPE models included (`Pretrained.timm_model`)."""
    return read_pretrained(checkpoint, model=model, which=which).timm_model()


def check_buffers(state: dict[str, Tensor], model: nn.Module, path: Path) -> dict[str, Tensor]:
    """`state` without the buffers `model` computes itself and does not save (non-persistent:
    DINOv3's RoPE `rope.periods`), each checked equal to the model's (relative 1e-2: official
    files may hold them in bfloat16): another RoPE base or period range is refused, naming it."""
    saved = model.state_dict()
    computed = {k: b for k, b in model.named_buffers() if k not in saved}
    for key in [k for k in state if k in computed]:
        got, want = state[key].float(), computed[key].float()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-2, atol=0.0):
            raise CheckpointError(
                f"{path}: {key} {tuple(got.shape)}: its values {got.tolist()[:4]}... are not "
                f"timm's {tuple(want.shape)} {want.tolist()[:4]}... (another RoPE base or "
                "period range than the model's)"
            )
    return {k: v for k, v in state.items() if k not in computed}


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
    family = official_family(unwrapped(state))
    try:
        state = backbone_keys(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if arch is not None:
        return architecture(arch), {}, state
    if spec_file is not None and spec_file.is_file():
        name, kwargs = read_spec(spec_file)
        kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
        return architecture(name), kwargs, state
    try:
        infer = family.infer if family is not None and family.infer else infer_architecture
        name, kwargs = infer(state, model.num_heads if model else 0)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}; the file's top-level keys: {top_keys[:20]}") from None
    return name, kwargs, state


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


def backbone_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Timm backbone names: `module.`/`backbone.` prefixes stripped, an official layout converted
    by its family (`official_family`: DINOv2's), method state dropped (`DROPPED`)."""
    out = unwrapped(state)
    if (family := official_family(out)) is not None and family.to_timm is not None:
        out = family.to_timm(out)
    return {k: v for k, v in out.items() if not DROPPED.search(k)}


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
    state, _ = select_state(read_checkpoint(weights), which, weights)
    return official_formula(unwrapped(state))


def load_strict(
    backbone: Backbone, state: dict[str, Tensor], source: Path | str, top_keys: list[str]
) -> None:
    """load_state_dict(strict=True), after one error listing every mismatch (first 20 each)."""
    if mismatches := key_mismatches(backbone.state_dict(), state):
        raise CheckpointError(
            f"{source}: does not fit {backbone.name} {backbone.timm_kwargs} (after the key "
            "mapping: module./backbone. prefixes stripped; heads, mask/dist tokens and decoder "
            f"dropped){mismatches}\n  the file's top-level keys: {top_keys[:20]}"
        )
    backbone.load_state_dict(state, strict=True)


def key_mismatches(want: dict[str, Tensor], state: dict[str, Tensor]) -> str:
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


def select_state(obj: Any, which: str | None, path: Path) -> tuple[dict[str, Tensor], list[str]]:
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


def override(kwargs: dict[str, Any], model: ModelConfig) -> dict[str, Any]:
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
        name, kwargs = read_spec(spec)
    elif arch or name:
        name = get_arch_name(arch or name)  # a pretrained tag is ignored: nothing is downloaded
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
    else:
        raise CheckpointError(f"{path}: no JSON naming its model beside it: give it as NAME=PATH")
    state, top_keys = select_state(read_checkpoint(path), None, path)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot build the timm model {name} {kwargs}: {e}") from None
    if mismatches := key_mismatches(model.state_dict(), state):
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
