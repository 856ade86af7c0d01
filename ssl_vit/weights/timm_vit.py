"""timm-named ViT state dicts (timm's own files, official MAE / DINO / DeiT files once unwrapped):
the VisionTransformer they hold, read from their shapes. A classifier head is not the backbone."""

from __future__ import annotations

import math
import re
from typing import Any

import timm
from torch import Tensor

from ssl_vit.weights.deit import distilled_name
from ssl_vit.weights.dinov2 import dinov2_kwargs, dinov2_name
from ssl_vit.weights.family import Family
from ssl_vit.weights.io import CheckpointError

FAMILY = Family("timm", dropped=r"^head\.")

STANDARD_VITS = {
    192: ("tiny", 3),
    384: ("small", 6),
    768: ("base", 12),
    1024: ("large", 16),
    1280: ("huge", 16),
}
"""Width -> (timm size name, attention heads) of the standard ViT sizes (Ti, S, B, L, H)."""


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
    size, heads = STANDARD_VITS.get(dim, ("base", 0))
    heads = num_heads or heads
    if not heads:
        raise CheckpointError(
            f"width {dim} is no standard ViT size ({sorted(STANDARD_VITS)}): give the number "
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
        return dinov2_name(dim, reg), kwargs | dinov2_kwargs(reg, prefix, layer_scale)
    name = name if timm.is_model(name) else "vit_base_patch16_224"
    return (distilled_name(name) if prefix == 2 else name), kwargs
