"""Continued pretraining (model.init): a method's networks started from any checkpoint that
`--checkpoint` takes. Backbones come through `weights.load_pretrained` (architecture, official key
maps, position embedding brought to the run's grid); a method's own state (MAE's decoder, DINO's
heads and center, DeiT's heads and distillation token) comes from the file's tensors when it has
them, in the method's own names (`method_tensors`)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.config import ModelConfig
from ssl_vit.weights import (
    CheckpointError,
    latest_checkpoint,
    load_pretrained,
    load_strict,
    parse_checkpoint,
    read_checkpoint,
)


def init_backbone(target: Backbone, checkpoint: str, which: str = "teacher") -> None:
    """Copy the backbone `checkpoint` holds (`which` network of a DINO training file) into
    `target`, built for target's grid.

    The one place where continued pretraining chooses how a checkpoint's position embedding
    reaches the run's grid: `load_pretrained`'s resampling (an official DINOv2 file's own formula,
    else bicubic; timm's checkpoint_filter_fn); MAE then puts back its fixed sin-cos
    (MAE.init_from)."""
    size = target.grid_size[0] * target.patch_size
    source = load_pretrained(
        checkpoint, model=ModelConfig(img_size=size, num_heads=target.num_heads), which=which
    )
    load_strict(target, source.state_dict(), checkpoint, [])


def has_student(checkpoint: str) -> bool:
    """Whether `checkpoint` is a file holding a DINO student network beside its teacher."""
    path, _ = parse_checkpoint(checkpoint)
    if path.is_dir():
        return False
    obj = read_checkpoint(path)
    return isinstance(obj, dict) and "student" in obj and "teacher" in obj


def method_tensors(checkpoint: str) -> dict[str, Tensor]:
    """The tensors of `checkpoint`, in our methods' state-dict names where its layout is known:

    our run directory (its newest complete checkpoint) or one of its `checkpoints/step_*`
    folders: the method state as saved (MAE `mask_token`, `decoder_*`; DINO `head.*`,
    `teacher.head.*`; DeiT `student.*`); an official DINO training file: `module.head.*` ->
    `head.*`, the teacher's `head.*` -> `teacher.head.*`; any other file: its `model` /
    `state_dict` entry or itself (official MAE `_full` decoder keys and DeiT heads are ours
    already). A backbone-only file holds none."""
    path, _ = parse_checkpoint(checkpoint)
    if path.is_dir():
        step = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
        weights = Path(step or path) / "model.safetensors"
        return load_file(str(weights)) if weights.is_file() else {}
    obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        return {}
    if "student" in obj and "teacher" in obj:
        out = {k.replace("module.", "", 1): v for k, v in obj["student"].items()}
        out = {k: v for k, v in out.items() if k.startswith("head.")}
        return out | {f"teacher.{k}": v for k, v in obj["teacher"].items() if k.startswith("head.")}
    state = obj.get("model", obj.get("state_dict", obj))
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def load_part(module: nn.Module, tensors: dict[str, Tensor], prefix: str, source: str) -> bool:
    """Load the tensors named `prefix`* into `module` (strictly: all of its keys, each shape), when
    `tensors` holds any; False when it holds none. A part that does not fit is a CheckpointError
    naming it (its config must match the file's)."""
    part = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not part:
        return False
    try:
        module.load_state_dict(part, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:600]
        raise CheckpointError(
            f"{source}: its {prefix}* does not fit this {type(module).__name__} (the method's "
            f"config must match the file's): {detail}"
        ) from None
    return True


def init_student_teacher(
    backbone: Backbone, head: nn.Module, teacher: nn.Module, checkpoint: str
) -> list[str]:
    """DINO: the teacher (`.backbone`, `.head`) from `checkpoint`, head when it has one; the
    student (`backbone`, `head`) from its student network when it has one (official training
    files), else as a copy of the teacher (released backbones, our runs), as DINO starts.
    Returns what was taken."""
    tensors, student = method_tensors(checkpoint), has_student(checkpoint)
    init_backbone(teacher.backbone, checkpoint, "teacher")
    taken = ["teacher backbone"]
    if load_part(teacher.head, tensors, "teacher.head.", checkpoint):
        taken.append("teacher head")
    if student:
        init_backbone(backbone, checkpoint, "student")
        if load_part(head, tensors, "head.", checkpoint):
            taken.append("student head")
    else:
        backbone.load_state_dict(teacher.backbone.state_dict())
        head.load_state_dict(teacher.head.state_dict())
    return taken + ["student backbone" if student else "student = teacher"]


def init_classifier(student: nn.Module, checkpoint: str) -> list[str]:
    """DeiT: the student's backbone (`.backbone`) from `checkpoint`, and its heads and
    distillation token where the file has them for as many classes (official DeiT files, our
    DeiT runs). Returns what was taken."""
    init_backbone(student.backbone, checkpoint)
    tensors, want = method_tensors(checkpoint), student.state_dict()
    parts = {k[8:]: v for k, v in tensors.items() if k.startswith("student.")}  # our runs
    parts |= {k: v for k, v in tensors.items() if k.startswith(("head", "dist_token"))}
    if "dist_token" in tensors and "pos_embed" in tensors:  # official: cls, dist, patches
        parts["dist_pos_embed"] = tensors["pos_embed"][:, 1:2]
    fits = {
        k: v for k, v in parts.items()
        if not k.startswith("backbone.") and k in want and v.shape == want[k].shape
    }  # fmt: skip
    student.load_state_dict(fits, strict=False)
    return ["student backbone", *sorted({k.split(".")[0] for k in fits})]
