"""The batched colour and filter operations of a DINO crop: torchvision's uint8 formulas for
brightness, contrast, saturation and hue (`JITTER_OPS`) and Gaussian blur, each over a batch with
one factor per image, and `apply_to`, which runs one on the images a host mask selects.

Why batched: every image of a batch takes its own factor, and an operation runs only on the
images its coin selected, without a device sync.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import conv2d, pad
from torchvision.transforms.v2 import functional as F

from ssl_vit.data.transforms import BLUR_KERNEL


def apply_to(x: Tensor, mask: Tensor, fn: Any, *args: Tensor) -> Tensor:
    """x[k] = fn(x[k], *(a[k] for a in args)) for the images k where the host bool (B,) mask
    holds, in place. The mask is on the host, so selecting needs no device sync, and the
    augmentation runs only on the images it applies to."""
    rows = mask.nonzero().squeeze(1)
    if len(rows):
        idx = rows.to(x.device)
        x[idx] = fn(x[idx], *(a[rows].to(x.device) for a in args))
    return x


def _grayscale(x: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 1, H, W) luma, floored: the degenerate image of
    torchvision's uint8 contrast and saturation kernels."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _blend(x: Tensor, y: Tensor, ratio: Tensor) -> Tensor:
    """uint8 x * ratio + y * (1 - ratio) per image (ratio (B,)), clamped and truncated to uint8,
    as torchvision's `_blend` (1 - ratio in float64, as its Python arithmetic)."""
    r = ratio.view(-1, 1, 1, 1)
    out = x * r + y * (1 - r.double()).float()
    return out.clamp_(0, 255).to(torch.uint8)


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    """F.adjust_brightness per image: uint8 (B, 3, H, W), factor (B,) -> uint8."""
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 255).to(torch.uint8)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """F.adjust_contrast per image: blend with the image's mean (floored) luma."""
    return _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def saturation(x: Tensor, factor: Tensor) -> Tensor:
    """F.adjust_saturation per image: blend with the (floored) luma image."""
    return _blend(x, _grayscale(x), factor)


HSV_TO_RGB = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))
"""For each RGB channel and hue sextant, which of (v, p, q, t) it takes."""


def hue(x: Tensor, shift: Tensor) -> Tensor:
    """F.adjust_hue per image: uint8 (B, 3, H, W), shift (B,) in turns -> uint8; through HSV in
    float32 with torchvision's formulas (Pillow's), so equal to it."""
    image = F.to_dtype(x, torch.float32, scale=True)
    r, g, _ = image.unbind(1)
    maxc, minc = image.amax(1), image.amin(1)
    flat = maxc == minc  # gray pixels: hue and saturation 0, and no division by zero
    ones = torch.ones_like(maxc)
    span = maxc - minc
    s = span / torch.where(flat, ones, maxc)
    rel = (maxc.unsqueeze(1) - image) / torch.where(flat, ones, span).unsqueeze(1)
    rc, gc, bc = rel.unbind(1)
    not_r, is_g = maxc != r, maxc == g
    h = (bc - gc) * ~not_r + (rc + 2.0 - bc) * (is_g & not_r) + (gc + 4.0 - rc) * (not_r & ~is_g)
    h = (h * (1.0 / 6.0) + 1.0).fmod_(1.0)
    h = (h + shift.view(-1, 1, 1)).remainder_(1.0)
    # back to RGB
    h6 = h * 6
    sector = torch.floor(h6)
    f = h6 - sector
    sxf, one_minus_s = s * f, 1.0 - s
    q = ((1.0 - sxf) * maxc).clamp_(0.0, 1.0)
    t = ((sxf + one_minus_s) * maxc).clamp_(0.0, 1.0)
    p = (one_minus_s * maxc).clamp_(0.0, 1.0)
    vpqt = torch.stack((maxc, p, q, t), dim=1)
    table = torch.tensor(HSV_TO_RGB, device=x.device)
    select = table[:, sector.int().remainder_(6)].movedim(0, 1)  # (B, 3, H, W)
    return F.to_dtype(vpqt.gather(1, select), torch.uint8, scale=True)


JITTER_OPS = (brightness, contrast, saturation, hue)
"""v2.ColorJitter's operations, in its numbering (CropParams.order)."""


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """F.gaussian_blur with a BLUR_KERNEL kernel per image, as transforms.GaussianBlur does to a
    tensor image, but separable (equal up to float rounding).

    uint8 (B, 3, H, W), sigma (B,) -> uint8."""
    b, c, h, w = x.shape
    k = BLUR_KERNEL
    lim = (k - 1) / (2.0 * math.sqrt(2.0))
    grid = torch.linspace(-lim, lim, k, device=x.device)
    kernel = (grid / sigma[:, None]).pow(2).neg().softmax(dim=1).repeat_interleave(c, dim=0)
    y = pad(x.float().view(1, b * c, h, w), [k // 2] * 4, mode="reflect")
    y = conv2d(y, kernel.view(b * c, 1, 1, k), groups=b * c)
    y = conv2d(y, kernel.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w).round_().to(torch.uint8)
