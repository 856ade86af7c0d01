"""Official DeiT files (`deit_*.pth`: `{"model": state}` in timm's names, a classifier head;
distilled: `dist_token`, `head_dist.*`, pos_embed of cls, dist and patches), and the distilled
network DeiT distillation trains and exports."""

from __future__ import annotations

import re
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.weights.family import Family

FAMILY = Family("deit", dropped=r"^head\.|^head_dist\.")
"""The classifier heads; the distillation token stays: the distilled model's features need it."""


def distilled_name(name: str) -> str:
    """timm's DeiT distilled ViT of the size in a ViT name (built with explicit sizes)."""
    size = re.search(r"(tiny|small|base)", name)
    return f"deit_{size[1] if size else 'base'}_distilled_patch16_224"


@torch.no_grad()
def distilled_backbone(backbone: Backbone) -> Backbone:
    """`backbone` as timm's DeiT distilled ViT (`distilled_name`, its sizes and kwargs): its
    weights, plus a distillation token after cls with its own position embedding, each drawn
    trunc_normal(std 0.02) as DeiT's models.py; the forward then runs cls, dist, patches."""
    if backbone.pos_embed is None:
        raise ValueError(
            f"DeiT distillation: {backbone.name} has rotary positions and no distillation token "
            "(timm's deit_*_distilled ViT has one, with its position): use method.distillation "
            "none, or a VisionTransformer"
        )
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
