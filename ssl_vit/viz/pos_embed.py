"""Position-embedding similarity (ViT, Dosovitskiy et al., 2010.11929, Figure 7 left)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ssl_vit.backbone import Backbone


def patch_pos_embed(backbone: Backbone) -> Tensor:
    """(L, D) the learned or fixed position embedding of the patches (prefix positions dropped),
    row-major on backbone.grid_size."""
    if backbone.pos_embed is None:
        raise ValueError(f"{backbone.name} has no absolute position embedding")
    start = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
    return backbone.pos_embed[0, start:].detach().float()


def pos_embed_similarity(pos: Tensor) -> Tensor:
    """pos (L, D) -> (L, L) cosine similarity of every patch's embedding to every other's."""
    pos = F.normalize(pos.float(), dim=-1)
    return pos @ pos.T
