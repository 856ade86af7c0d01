"""Official DINOv2 files (`dinov2_vit{s,b,l}14[_reg4]_pretrain.pth`, the `backbone.*` of a
training `teacher_checkpoint.pth`), converted to timm's DINOv2 ViT (vit_*_patch14[_reg4]_dinov2)."""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ssl_vit.backbone import PosInterp
from ssl_vit.weights.family import Family
from ssl_vit.weights.io import CheckpointError

CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
"""A DINOv2 block under FSDP chunking (block_chunks > 0): `blocks.{chunk}.{i}.`, i global."""
SWIGLU = re.compile(r"^blocks\.\d+\.mlp\.w(12|3)\.")
"""DINOv2's SwiGLU feed-forward (ffn_layer swiglufused: ViT-g/14 and the vitl14/vitg14 training
configs), which is not timm's Mlp."""
SIZES = {384: "small", 768: "base", 1024: "large"}
"""Width -> timm's DINOv2 size name (vit_{size}_patch14[_reg4]_dinov2)."""


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
    if swiglu := next((k for k in state if SWIGLU.match(k)), None):
        raise CheckpointError(
            f"{swiglu}: a DINOv2 SwiGLU feed-forward (ViT-g/14, ffn_layer swiglufused) is not "
            "supported; only the MLP of ViT-S/B/L/14 (blocks.*.mlp.fc1, fc2)"
        )
    out = {CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state.items()}
    if "register_tokens" in out:
        pos = out["pos_embed"]
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def dinov2_interp(state: dict[str, Tensor]) -> PosInterp | None:
    if not official_dinov2(state):
        return None
    return "antialias" if "register_tokens" in state else "offset"


def dinov2_name(dim: int, reg: Tensor | None) -> str:
    """timm's DINOv2 ViT of width `dim` (base for another width: the kwargs size it)."""
    return f"vit_{SIZES.get(dim, 'base')}_patch14_{'' if reg is None else 'reg4_'}dinov2"


def dinov2_kwargs(reg: Tensor | None, prefix: int, layer_scale: bool) -> dict[str, Any]:
    """What differs from `dinov2_name`'s defaults (4 registers and no cls position with
    registers, a cls position without; layer scale)."""
    registers = 0 if reg is None else reg.shape[1]
    kwargs: dict[str, Any] = {} if registers in (0, 4) else {"reg_tokens": registers}
    if (prefix == 0) != (registers > 0):
        kwargs["no_embed_class"] = prefix == 0
    if not layer_scale:
        kwargs["init_values"] = None
    return kwargs


FAMILY = Family(
    "dinov2",
    dropped=r"^(dino_head|ibot_head)\.|^mask_token$",
    detect=official_dinov2,
    to_timm=dinov2_keys,
    interp=dinov2_interp,
)
"""The DINO and iBOT heads and the (1, D) mask token are method state."""
