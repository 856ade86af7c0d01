"""Crop sampling and resizing: the per-batch host generator (`batch_generator`), each `Crop`'s
draws for a batch (`sample_crops`, `CropParams`, `sample_params`), the batched resized crops,
and `augment_crop`, one crop of every image with its flip and colour steps.

Why on the host: every crop box is needed there (each crop is resized on its own), and masks
known there select the images an augmentation touches, so no draw waits for the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn.functional import interpolate
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ssl_vit.data.device.colour import JITTER_OPS, apply_to, gaussian_blur
from ssl_vit.data.transforms import BLUR_SIGMA, JITTER, Crop

RATIO = (3.0 / 4.0, 4.0 / 3.0)
"""RandomResizedCrop's aspect-ratio range, as single_view uses it (torchvision's default)."""
ATTEMPTS = 10
"""Tries of RandomResizedCrop.make_params before its centre-crop fallback."""


def batch_generator(*key: int) -> torch.Generator:
    """A host generator seeded from `key`, e.g. (seed, epoch, batch index, rank): the same
    augmentation for the same batch after a resume, independent across processes.

    On the host because every crop box is needed there (each crop is resized on its own) and
    masks known there select the images an augmentation touches: no draw waits for the device
    (a device draw read back would wait for the steps queued before it)."""
    hi, lo = (int(s) for s in np.random.SeedSequence(list(key)).generate_state(2))
    return torch.Generator().manual_seed(hi << 32 | lo)


def sample_crops(
    sizes: Tensor,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = RATIO,
) -> Tensor:
    """RandomResizedCrop.make_params for a batch, vectorised on the generator's device.

    sizes: int (B, 2) image (height, width) -> int64 (B, 4) (top, left, height, width).

    The same distribution as torchvision's loop: up to ATTEMPTS draws of area fraction ~
    U(scale) and log aspect ratio ~ U(log ratio), w = round(sqrt(area * r)), h = round(sqrt(area
    / r)); the first draw that fits is kept, at a uniform integer position; none fits -> the
    centre crop clamped to the ratio range. All attempts are drawn at once and the first fitting
    one taken, which leaves the distribution unchanged and needs no host sync.
    """
    dev = generator.device
    sizes = sizes.to(dev)
    b = sizes.shape[0]
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    # float32 draws like torchvision's torch.empty(1).uniform_(lo, hi); the rest in float64 as
    # its Python arithmetic
    u = torch.rand(b, ATTEMPTS, 2, generator=generator, device=dev)
    area_frac = scale[0] + (scale[1] - scale[0]) * u[..., 0]
    log_ratio = torch.log(torch.tensor(ratio, device=dev))
    aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[..., 1])
    target = height * width * area_frac.double()
    w = torch.round(torch.sqrt(target * aspect.double()))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(target / aspect.double()))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first fitting attempt
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    height, width = height.squeeze(1), width.squeeze(1)
    pos = torch.rand(b, 2, generator=generator, device=dev, dtype=torch.float64)
    top = torch.minimum(torch.floor(pos[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(pos[:, 1] * (width - w + 1)), width - w)
    # fallback: the whole image, narrowed to the nearest allowed aspect ratio, centred
    in_ratio = width / height
    fb_w = torch.where(in_ratio > max(ratio), torch.round(height * max(ratio)), width)
    fb_h = torch.where(in_ratio < min(ratio), torch.round(width / min(ratio)), height)
    fb_top, fb_left = torch.floor((height - fb_h) / 2), torch.floor((width - fb_w) / 2)
    ok = fits.any(dim=1)
    params = torch.stack(
        [
            torch.where(ok, top, fb_top),
            torch.where(ok, left, fb_left),
            torch.where(ok, h, fb_h),
            torch.where(ok, w, fb_w),
        ],
        dim=1,
    )
    return params.long()


class CropParams(NamedTuple):
    """The draws of one `Crop` for a batch of B images, host tensors; the distributions of the
    CPU view's transforms (`transforms.crop_transform`)."""

    boxes: Tensor
    """int64 (B, 4): top, left, height, width (`sample_crops`)."""
    flip: Tensor
    """bool (B,): p = data.hflip."""
    jitter: Tensor
    """bool (B,): colour jitter, p = crop.jitter."""
    order: Tensor
    """int64 (B, 4): the jitter's operations in the order applied (JITTER_OPS indices), a
    uniform permutation as v2.ColorJitter's randperm."""
    factors: Tensor
    """float32 (B, 4): brightness, contrast, saturation factors ~ U(1 -+ JITTER[:3]), hue shift
    ~ U(-+JITTER[3])."""
    gray: Tensor
    """bool (B,): p = crop.grayscale."""
    blur: Tensor
    """bool (B,): p = crop.blur."""
    sigma: Tensor
    """float32 (B,): blur sigma ~ U(BLUR_SIGMA)."""
    solarize: Tensor
    """bool (B,): p = crop.solarize."""


def sample_params(
    crop: Crop, sizes: Tensor, hflip: float, generator: torch.Generator
) -> CropParams:
    """Draw `crop`'s randomness for images of `sizes` int (B, 2) (height, width)."""
    b = sizes.shape[0]

    def coin(p: float) -> Tensor:
        return torch.rand(b, generator=generator) < p

    def uniform(lo: Tensor | float, hi: Tensor | float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    b_, c_, s_, h_ = JITTER
    lo, hi = torch.tensor([1 - b_, 1 - c_, 1 - s_, -h_]), torch.tensor([1 + b_, 1 + c_, 1 + s_, h_])
    return CropParams(
        boxes=sample_crops(sizes, crop.scale, generator),
        flip=coin(hflip),
        jitter=coin(crop.jitter),
        order=torch.rand(b, 4, generator=generator).argsort(dim=1),
        factors=uniform(lo, hi, 4),
        gray=coin(crop.grayscale),
        blur=coin(crop.blur),
        sigma=uniform(*BLUR_SIGMA),
        solarize=coin(crop.solarize),
    )


def resized_crops(
    images: Sequence[Tensor], boxes: Tensor, size: int, interpolation: str | InterpolationMode
) -> Tensor:
    """images uint8 (3, H_k, W_k) on one device, boxes int64 (B, 4) on the host
    -> uint8 (B, 3, size, size): each box resized (antialiased) as RandomResizedCrop resizes a
    uint8 tensor image on that device. torchvision resizes uint8 natively on the CPU; elsewhere it
    goes through float32, then clamps and rounds (`resized_crops_float`)."""
    if images[0].device.type != "cpu":
        return resized_crops_float(images, boxes, size, interpolation)
    mode = InterpolationMode(interpolation)
    return torch.stack(
        [
            F.resized_crop(image, top, left, h, w, [size, size], mode, antialias=True)
            for image, (top, left, h, w) in zip(images, boxes.tolist(), strict=True)
        ]
    )


def resized_crops_float(
    images: Sequence[Tensor], boxes: Tensor, size: int, interpolation: str | InterpolationMode
) -> Tensor:
    """torchvision's float route of `resized_crops` (its CUDA one), with the float copy made once
    per image rather than per crop and the clamp and rounding batched: the same values with one
    kernel per crop (DINO takes 12 per image)."""
    mode = InterpolationMode(interpolation)
    smooth = mode in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)  # else nearest
    kwargs = dict(mode=mode.value, align_corners=False if smooth else None, antialias=smooth)
    floats: dict[int, Tensor] = {}  # one copy per distinct image (a batch may repeat one)
    crops = []
    for image, (top, left, h, w) in zip(images, boxes.tolist(), strict=True):
        src = floats.setdefault(id(image), image.float())
        crop = src[None, :, top : top + h, left : left + w]
        crops.append(interpolate(crop, [size, size], **kwargs) if (h, w) != (size, size) else crop)
    out = torch.cat(crops)
    if mode == InterpolationMode.BICUBIC:  # overshoots
        out.clamp_(0, 255)
    return out.round_().to(torch.uint8)


def augment_crop(
    images: Sequence[Tensor], crop: Crop, p: CropParams, interpolation: str | InterpolationMode
) -> Tensor:
    """One crop of every image with its drawn params: uint8 (3, H_k, W_k) -> uint8 (B, 3, s, s),
    s = crop.size; `crop_transform`'s steps in its order."""
    x = resized_crops(images, p.boxes, crop.size, interpolation)
    apply_to(x, p.flip, F.horizontal_flip)
    if crop.jitter:
        for step in range(4):  # each image's own order of the four operations
            for index, op in enumerate(JITTER_OPS):
                apply_to(x, p.jitter & (p.order[:, step] == index), op, p.factors[:, index])
    if crop.grayscale:
        apply_to(x, p.gray, partial(F.rgb_to_grayscale, num_output_channels=3))
    if crop.blur:
        apply_to(x, p.blur, gaussian_blur, p.sigma)
    if crop.solarize:
        apply_to(x, p.solarize, partial(F.solarize, threshold=128))
    return x
