"""Attention read-outs: every block's attention, cls->patch maps, DINO's mass threshold, and the
mean attention distance of ViT (Dosovitskiy et al., 2010.11929, Figure 7 right)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from ssl_vit.backbone import Backbone, attention_probs

R = TypeVar("R")


@torch.no_grad()
def layer_attentions(
    backbone: Backbone, images: Tensor, reduce: Callable[[Tensor], R] = lambda a: a
) -> list[R]:
    """[reduce(attn_i) for each block i], attn_i (B, heads, T, T) the block's softmax attention on
    images (B, C, H, W), T = prefix + all patch tokens.

    Each block's input (and its rotary rows, for a RoPE backbone) is caught by a forward pre-hook
    and its attention recomputed eagerly (`attention_probs`), so this works whatever attention
    kernel the blocks run, without a change to the backbone; `reduce` runs inside the hook, so a
    large batch never holds every layer's (B, heads, T, T) at once.
    """
    out: list[R] = []
    handles = [
        block.register_forward_pre_hook(
            lambda b, args, kw: out.append(reduce(attention_probs(b, args[0], kw.get("rope")))),
            with_kwargs=True,
        )
        for block in backbone.blocks
    ]
    try:
        backbone(images)
    finally:
        for h in handles:
            h.remove()
    return out


def cls_attention_maps(attn: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """attn (B, heads, T, T) -> (B, heads, h, w): the cls query's attention to each patch, as DINO
    shows it (not renormalised; the mass on prefix tokens is left out)."""
    if num_prefix < 1:
        raise ValueError("cls attention needs a cls token; this backbone has no prefix token")
    return attn[:, :, 0, num_prefix:].unflatten(-1, grid)


def threshold_mask(attn: Tensor, fraction: float) -> Tensor:
    """Bool mask, same shape as attn (..., N): the fewest largest entries of each row holding at
    least `fraction` of the row's mass (DINO's visualize_attention: sort, cumulative sum, keep).

    An entry is kept when the mass of the entries ranked above it is still below the fraction.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    val, idx = attn.sort(dim=-1, descending=True)
    val = val / val.sum(dim=-1, keepdim=True)
    keep_sorted = (val.cumsum(dim=-1) - val) < fraction
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


def patch_distances(grid: tuple[int, int], patch_size: int) -> Tensor:
    """(L, L) Euclidean distances in pixels between the centres of the row-major patches."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=-1).double() * patch_size
    return torch.cdist(centres, centres).float()


def mean_attention_distance(
    attn: Tensor, num_prefix: int, grid: tuple[int, int], patch_size: int
) -> Tensor:
    """attn (B, heads, T, T) -> (B, heads) mean attention distance in pixels.

    ViT's definition: for each query patch, the distance to every other patch weighted by the
    attention weight (a weighted average, so the weights over patches are renormalised to sum to
    one: prefix tokens have no position and their share is left out), then averaged over the
    query patches. Prefix rows (cls, registers) are not queries. Distances between patch centres.
    """
    a = attn[:, :, num_prefix:, num_prefix:].float()
    if a.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"attention over {a.shape[-1]} patches does not fit a {grid} grid")
    a = a / a.sum(dim=-1, keepdim=True)
    dist = patch_distances(grid, patch_size).to(a.device)
    return (a * dist).sum(dim=-1).mean(dim=-1)
