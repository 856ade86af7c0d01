"""The DINOv2 figure (Oquab et al., 2304.07193, Fig. 1): the first three principal components of
the patch features of a set of images, shown as RGB, the background removed by thresholding the
first component."""

from __future__ import annotations

import torch
from torch import Tensor


def principal_axes(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, D) -> (mean (D,), the top-k principal axes (D, k) by variance, their share of the
    total variance (k,)). Eigendecomposition of the covariance in float64: deterministic."""
    x = x.double()
    mean = x.mean(dim=0)
    cov = (x - mean).T @ (x - mean) / max(len(x) - 1, 1)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    top = values.flip(0)[:k]
    return mean, vectors.flip(1)[:, :k], top / values.sum().clamp_min(1e-12)


def pca_rgb(
    feats: Tensor, grid: tuple[int, int], threshold: float = 0.0, remove_background: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """feats (B, h*w, D) patch features of B images (row-major patches) -> (RGB (B, 3, h, w) in
    [0, 1], foreground mask (B, h, w) bool, explained variance (3,) of the RGB components).

    One PCA over the patches of all images (so colours correspond across images). Foreground:
    patches whose first component, standardised, exceeds `threshold`; its sign is chosen so most
    border patches (mostly background) are below. A second PCA over the foreground patches gives
    the three components, each min-max scaled over the foreground to a colour channel; the
    background is black. With remove_background False every patch is foreground."""
    b, n, d = feats.shape
    flat = feats.reshape(b * n, d).double()
    mean, axis, _ = principal_axes(flat, 1)
    first = ((flat - mean) @ axis[:, 0]).reshape(b, *grid)
    first = first / first.std().clamp_min(1e-12)
    border = torch.ones(grid, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    if (first[:, border] > threshold).float().mean() > 0.5:  # a vote: robust to a skewed tail
        first = -first
    fg = first > threshold if remove_background else torch.ones_like(first, dtype=torch.bool)
    if not fg.any():
        fg = torch.ones_like(fg)
    keep = fg.reshape(-1)
    mean, axes, explained = principal_axes(flat[keep], 3)
    comps = (flat - mean) @ axes  # (B*n, 3)
    lo, hi = comps[keep].min(dim=0).values, comps[keep].max(dim=0).values
    rgb = ((comps - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1) * keep[:, None]
    rgb = rgb.reshape(b, *grid, 3).permute(0, 3, 1, 2).float()
    return rgb, fg, explained.float()
