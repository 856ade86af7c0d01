"""Frozen features of a backbone, as the k-NN and linear-probe protocols read them.

cls: the last n blocks' cls tokens (each through the final norm), concatenated — n = 1 is the
k-NN and MAE linear-probe feature, n = 4 DINO's ViT-S linear probe. avgpool: the mean of the last
block's patch tokens. cls_avgpool: both, concatenated (DINO's ViT-B linear probe; its eval_linear
interleaves the two vectors element by element, so its official head's columns are a permutation).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ssl_vit.backbone import Backbone

Pool = Literal["cls", "avgpool", "cls_avgpool"]


def feature_dim(backbone: Backbone, pool: Pool = "cls", n_last: int = 1) -> int:
    """The width of `features(backbone, ..., pool, n_last)`."""
    d = backbone.embed_dim
    return {"cls": n_last * d, "avgpool": d, "cls_avgpool": (n_last + 1) * d}[pool]


def features(backbone: Backbone, images: Tensor, pool: Pool = "cls", n_last: int = 1) -> Tensor:
    """images (B, C, H, W) -> (B, feature_dim). Gradients flow unless the caller disables them."""
    if not 1 <= n_last <= backbone.depth:
        raise ValueError(f"n_last must be in [1, {backbone.depth}], got {n_last}")
    out = backbone(images, n_last=n_last)
    if pool != "avgpool" and out.num_prefix < 1:
        raise ValueError(f"pool {pool!r} needs a cls token; this backbone has none")
    cls = [layer[:, 0] for layer in out.layers]
    avg = [out.layers[-1][:, out.num_prefix :].mean(dim=1)]
    return torch.cat({"cls": cls, "avgpool": avg, "cls_avgpool": cls + avg}[pool], dim=-1)
