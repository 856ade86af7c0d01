"""timm's RandAugment and random erasing (DeiT's and fine-tuning's training view,
`transforms.supervised_view`) batched on the device, for data.decode_on_device.

Why: RandAugment in PIL runs at a few hundred img/s per loader worker, while DeiT-S at 40 % MFU
on an H100 takes over ten thousand. Here the draws come from timm's own RandAugment object: which
operations, whether each applies, their magnitudes (and noise), signs and resampling filters are
drawn per image on the host by timm's code paths (`draw_randaugment`), so the distribution is
timm's. The operations then run batched on the device over the images each applies to, with
Pillow's integer formulas: the point operations (auto-contrast, equalize, invert, posterize,
solarize, solarize-add, colour, contrast, brightness, sharpness) equal timm's on the same image;
the affine ones (rotate, shear, translate) resample with `grid_sample` as Pillow's
`Image.transform` does (pixel centres, edge clamping, fill outside, truncation): within one level
of it on bilinear, ~1.5 levels on average on bicubic, whose cubic kernel is torch's, not Pillow's
(tests/test_randaugment.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment, rand_augment_transform
from torch import Tensor
from torch.nn.functional import affine_grid, conv2d, grid_sample

from ssl_vit.data.datasets import seeded

_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
"""data.interpolation -> Pillow's filter ids, which timm's hparams and draws carry."""

# ---------------------------------------------------------------------------------------------
# point operations: uint8 (B, 3, H, W) and one argument per image (B,) -> uint8 (B, 3, H, W)


def _luma(x: Tensor) -> Tensor:
    """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, int32 (B, 1, H, W)."""
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """Pillow's Image.blend(degenerate, x, factor) (ImageEnhance): d + f * (x - d) in float32,
    clipped and truncated."""
    f = factor.float().view(-1, 1, 1, 1)
    d = degenerate.float()
    return (d + f * (x.float() - d)).clamp_(0, 255).to(torch.uint8)


def _lut(x: Tensor, lut: Tensor) -> Tensor:
    """x through a per image and channel table lut (B, 3, 256) (values clipped to 0..255, as
    Pillow's Image.point)."""
    b, c, h, w = x.shape
    table = lut.clamp(0, 255).to(torch.uint8)
    return table.gather(2, x.reshape(b, c, h * w).long()).view(b, c, h, w)


def invert(x: Tensor) -> Tensor:
    return 255 - x


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the `bits` high bits (0 bits: black, the project's reading of timm's top level)."""
    mask = 256 - 2 ** (8 - bits.long().clamp(0, 8))
    return x & mask.to(torch.uint8).view(-1, 1, 1, 1)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 255 - x, x)


def solarize_add(x: Tensor, add: Tensor, threshold: int = 128) -> Tensor:
    added = (x.int() + add.view(-1, 1, 1, 1)).clamp(max=255).to(torch.uint8)
    return torch.where(x < threshold, added, x)


def auto_contrast(x: Tensor) -> Tensor:
    """ImageOps.autocontrast: each channel's [min, max] stretched to [0, 255] (table in float64,
    truncated, as Pillow's Python loop)."""
    lo, hi = x.amin(dim=(2, 3)).double(), x.amax(dim=(2, 3)).double()
    scale = 255.0 / (hi - lo).clamp(min=1)
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    lut = (levels * scale[..., None] - (lo * scale)[..., None]).trunc()
    lut = torch.where((hi > lo)[..., None], lut, levels)
    return _lut(x, lut.long())


def equalize(x: Tensor) -> Tensor:
    """ImageOps.equalize per channel: lut[i] = (step // 2 + count below i) // step, step =
    (pixels - count of the last non-empty bin) // 255; identity when step is 0."""
    b, c, h, w = x.shape
    hist = torch.zeros(b, c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(
        2, x.reshape(b, c, h * w).long(), torch.ones_like(x, dtype=torch.long).view(b, c, -1)
    )
    last = 255 - (hist > 0).flip(2).int().argmax(dim=2, keepdim=True)
    step = (h * w - hist.gather(2, last)) // 255
    below = hist.cumsum(2) - hist
    lut = (step // 2 + below) // step.clamp(min=1)
    levels = torch.arange(256, device=x.device).expand_as(lut)
    return _lut(x, torch.where(step > 0, lut, levels))


def color(x: Tensor, factor: Tensor) -> Tensor:
    """ImageEnhance.Color: blend with the gray (L) image."""
    return _blend(_luma(x), x, factor)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """ImageEnhance.Contrast: blend with the image's mean gray level, rounded."""
    mean = _luma(x).double().mean(dim=(1, 2, 3), keepdim=True)
    return _blend(torch.floor(mean + 0.5), x, factor)


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return _blend(torch.zeros_like(x), x, factor)


SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13
"""Pillow's ImageFilter.SMOOTH kernel."""


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (rounded; the one-pixel
    border kept, as Pillow's 3 x 3 filter does)."""
    b, c, h, w = x.shape
    kernel = SMOOTH.to(x.device).expand(c, 1, 3, 3)
    smooth = conv2d(x.float(), kernel, groups=c).add_(0.5).floor_().clamp_(0, 255)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth.to(torch.uint8)
    return _blend(degenerate, x, factor)


# ---------------------------------------------------------------------------------------------
# affine operations, as Pillow's Image.transform(size, AFFINE, (a, b, c, d, e, f), resample,
# fillcolor): output pixel centre (x, y) samples the input at (a x + b y + c, d x + e y + f)


def _affine(matrices: Tensor, x: Tensor, resample: Tensor, fill: tuple[int, ...]) -> Tensor:
    """matrices float64 (B, 2, 3) in pixels (Pillow's coefficients), resample (B,) Pillow filter
    ids -> uint8 (B, 3, H, W): bilinear / bicubic / nearest with edge clamping; outside the
    image: fill."""
    b, c, h, w = x.shape
    to_norm = torch.tensor([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]], dtype=torch.float64)
    from_norm = torch.linalg.inv(to_norm)
    full = torch.cat([matrices, torch.tensor([[[0.0, 0.0, 1.0]]]).double().expand(b, 1, 3)], 1)
    theta = (to_norm @ full @ from_norm)[:, :2].float().to(x.device)
    grid = affine_grid(theta, [b, c, h, w], align_corners=False)
    out = torch.empty(b, c, h, w, device=x.device)
    for mode, pil in _PIL_FILTERS.items():
        rows = (resample == pil).nonzero().squeeze(1)
        if len(rows):
            idx = rows.to(x.device)
            out[idx] = grid_sample(
                x[idx].float(), grid[idx], mode, padding_mode="border", align_corners=False
            )
    inside = ((grid >= -1) & (grid < 1)).all(dim=-1, keepdim=True).movedim(-1, 1)  # (B,1,H,W)
    fill_t = torch.tensor(fill, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return torch.where(inside, out.clamp_(0, 255).trunc_(), fill_t).to(torch.uint8)


def _matrices(kind: str, value: Tensor, h: int, w: int) -> Tensor:
    """Pillow's affine coefficients (B, 2, 3) float64 for one timm operation per image."""
    v = value.double()
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if kind == "rotate":  # Image.rotate(degrees): counter-clockwise about the centre
        a = -torch.deg2rad(v)
        cos, sin = torch.cos(a), torch.sin(a)
        cx, cy = w / 2.0, h / 2.0
        rows = [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy]
    elif kind == "shear_x":
        rows = [one, v, zero, zero, one, zero]
    elif kind == "shear_y":
        rows = [one, zero, zero, v, one, zero]
    elif kind == "translate_x":  # pixels
        rows = [one, zero, v, zero, one, zero]
    else:  # translate_y
        rows = [one, zero, zero, zero, one, v]
    return torch.stack(rows, dim=1).view(-1, 2, 3)


def affine(kind: str, pixels_of: str = "") -> Callable[..., Tensor]:
    """A batched affine timm operation: (x, value, resample, fill) -> uint8, value and resample
    (B,) on the host. `pixels_of` "w" / "h": value is a fraction of the width / height (timm's
    *Rel translations)."""

    def op(x: Tensor, value: Tensor, resample: Tensor, fill: tuple[int, ...]) -> Tensor:
        h, w = x.shape[-2:]
        scale = {"w": w, "h": h}.get(pixels_of, 1)
        return _affine(_matrices(kind, value * scale, h, w), x, resample, fill)

    return op


OPS: dict[str, Callable[..., Tensor]] = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": affine("rotate"),
    "Posterize": posterize,
    "PosterizeIncreasing": posterize,
    "PosterizeOriginal": posterize,
    "Solarize": solarize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "Color": color,
    "ColorIncreasing": color,
    "Contrast": contrast,
    "ContrastIncreasing": contrast,
    "Brightness": brightness,
    "BrightnessIncreasing": brightness,
    "Sharpness": sharpness,
    "SharpnessIncreasing": sharpness,
    "ShearX": affine("shear_x"),
    "ShearY": affine("shear_y"),
    "TranslateX": affine("translate_x"),
    "TranslateY": affine("translate_y"),
    "TranslateXRel": affine("translate_x", "w"),
    "TranslateYRel": affine("translate_y", "h"),
}
"""timm's RandAugment operation names -> their batched counterparts."""
AFFINE = {
    "Rotate",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "TranslateXRel",
    "TranslateYRel",
}


# ---------------------------------------------------------------------------------------------
# draws and the view


@dataclass(frozen=True)
class Applied:
    """One operation an image gets: timm's op name, its level arguments, its resample filter."""

    name: str
    args: tuple[Any, ...]
    resample: int


def draw_randaugment(ra: RandAugment, n: int, seed: int) -> list[list[Applied | None]]:
    """For n images, per RandAugment layer: the operation applied (None: its 0.5 coin said no),
    drawn by timm's code: `RandAugment.__call__`'s numpy choice, then `AugmentOp.__call__`'s
    probability, magnitude noise and clipping, level function (random signs) and filter choice.
    -> [layer][image]."""
    layers: list[list[Applied | None]] = [[] for _ in range(ra.num_layers)]
    with seeded(seed):
        for _ in range(n):
            ops = np.random.choice(
                ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights
            )
            for layer, op in enumerate(ops):
                if op.prob < 1.0 and random.random() > op.prob:
                    layers[layer].append(None)
                    continue
                magnitude = op.magnitude
                if op.magnitude_std == float("inf"):
                    magnitude = random.uniform(0, magnitude)
                elif op.magnitude_std > 0:
                    magnitude = random.gauss(magnitude, op.magnitude_std)
                magnitude = max(0.0, min(magnitude, op.magnitude_max or 10.0))
                args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
                resample = op.kwargs["resample"]
                if isinstance(resample, (list, tuple)) and op.name in AFFINE:
                    resample = random.choice(resample)  # drawn inside timm's affine ops
                resample = resample if isinstance(resample, int) else int(resample[0])
                layers[layer].append(Applied(op.name, tuple(args), int(resample)))
    return layers


@dataclass(frozen=True)
class DeviceRandAugment:
    """RandAugment `policy` (timm's "rand-..." string) on uint8 batches on the device, with timm's
    hparams as `supervised_view` passes them (translate_const, img_mean fill, interpolation)."""

    policy: str
    img_size: int
    interpolation: str
    mean: tuple[float, ...]

    @property
    def fill(self) -> tuple[int, ...]:
        return tuple(min(255, round(255 * m)) for m in self.mean)

    def transform(self) -> RandAugment:
        """timm's RandAugment object, built as timm's create_transform builds it."""
        hparams = dict(translate_const=int(self.img_size * 0.45), img_mean=self.fill)
        if self.interpolation != "random":
            hparams["interpolation"] = _PIL_FILTERS[self.interpolation]
        return rand_augment_transform(self.policy, hparams)

    def __call__(self, x: Tensor, seed: int) -> Tensor:
        """x uint8 (B, 3, H, W) -> uint8, each image through its own drawn operations, in place:
        per layer and operation, one batched call on the images that drew it (selected on the
        host: no device sync)."""
        for layer in draw_randaugment(self.transform(), x.shape[0], seed):
            for name in sorted({a.name for a in layer if a is not None}):
                rows = [k for k, a in enumerate(layer) if a is not None and a.name == name]
                picked = [layer[k] for k in rows]
                idx = torch.tensor(rows).to(x.device)
                values = torch.tensor([a.args[0] for a in picked]) if picked[0].args else None
                if name in AFFINE:  # values and filters stay on the host: they build the grids
                    resample = torch.tensor([a.resample for a in picked])
                    x[idx] = OPS[name](x[idx], values, resample, self.fill)
                else:
                    args = [] if values is None else [values.to(x.device)]
                    x[idx] = OPS[name](x[idx], *args)
        return x


# ---------------------------------------------------------------------------------------------
# random erasing


def draw_erasing(n: int, h: int, w: int, probability: float, seed: int) -> Tensor:
    """timm's RandomErasing(probability, mode="pixel", max_count=1) boxes per image, drawn as its
    `_erase` draws them (area 2 %-1/3, log aspect ratio in log(0.3)..log(1/0.3), 10 attempts):
    int64 (n, 4) top, left, height, width; height 0 = not erased."""
    boxes = torch.zeros(n, 4, dtype=torch.long)
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    with seeded(seed):
        for k in range(n):
            if random.random() > probability:
                continue
            for _ in range(10):
                target = random.uniform(0.02, 1 / 3) * h * w
                aspect = math.exp(random.uniform(*log_ratio))
                eh = int(round(math.sqrt(target * aspect)))
                ew = int(round(math.sqrt(target / aspect)))
                if ew < w and eh < h:
                    top, left = random.randint(0, h - eh), random.randint(0, w - ew)
                    boxes[k] = torch.tensor([top, left, eh, ew])
                    break
    return boxes


def erase(x: Tensor, boxes: Tensor, generator: torch.Generator) -> Tensor:
    """x float (B, C, H, W), normalised -> each box filled with standard-normal values per pixel
    and channel (mode "pixel"), in place; `generator` on x's device."""
    b, c, h, w = x.shape
    top, left, eh, ew = (v.to(x.device).view(-1, 1, 1, 1) for v in boxes.T)
    rows = torch.arange(h, device=x.device).view(1, 1, -1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, -1)
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x.copy_(torch.where(inside, noise, x))
