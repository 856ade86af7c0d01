"""Per-method views: a view maps one image (PIL or uint8 tensor (3, H, W)) to a dict of tensors.

The keys are the batch contract (DESIGN.md § Batch): "images" for a single view (MAE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageFilter
from timm.data import create_transform
from timm.data.auto_augment import posterize as timm_posterize
from torchvision.transforms import v2

from ssl_vit.config import DataConfig


@dataclass(frozen=True)
class View:
    """image -> {key: transform(image)}.

    A class rather than a closure so that a dataset holding it pickles into spawned loader workers.
    """

    key: str
    transform: Callable[[Any], Any]

    def __call__(self, image: Any) -> dict[str, Any]:
        return {self.key: self.transform(image)}


def single_view(data_cfg: DataConfig, img_size: int) -> View:
    """MAE's view: random resized crop + horizontal flip, normalised.

    The crop runs before the tensor conversion, so PIL images are cropped and resized by PIL.

    image -> {"images": float32 (3, img_size, img_size)}, (x / 255 - mean) / std per channel.
    """
    return View(
        "images",
        v2.Compose(
            [
                v2.RandomResizedCrop(
                    img_size,
                    scale=data_cfg.crop_scale,
                    interpolation=data_cfg.interpolation,
                    antialias=True,
                ),
                v2.RandomHorizontalFlip(data_cfg.hflip),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(data_cfg.mean, data_cfg.std),
                v2.ToPureTensor(),
            ]
        ),
    )


def eval_view(data_cfg: DataConfig, img_size: int, crop_ratio: float = 0.875) -> View:
    """The evaluation view of every protocol: resize the short side to img_size / crop_ratio
    (256 for 224), center crop img_size, normalise. Deterministic.

    image -> {"images": float32 (3, img_size, img_size)}.
    """
    return View(
        "images",
        v2.Compose(
            [
                v2.Resize(
                    int(img_size / crop_ratio),
                    interpolation=data_cfg.interpolation,
                    antialias=True,
                ),
                v2.CenterCrop(img_size),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(data_cfg.mean, data_cfg.std),
                v2.ToPureTensor(),
            ]
        ),
    )


def supervised_view(
    data_cfg: DataConfig,
    img_size: int,
    *,
    auto_augment: str = "rand-m9-mstd0.5-inc1",
    color_jitter: float = 0.3,
    re_prob: float = 0.25,
) -> View:
    """DeiT's training view, timm's `create_transform` as the official code calls it: random
    resized crop (data.crop_scale), flip, RandAugment (colour jitter only without it, as timm
    does), normalise, random erasing (per-pixel values). Mixup/CutMix run later, on the batch.

    image (PIL, or uint8 tensor (3, H, W): made PIL, which timm's RandAugment needs)
    -> {"images": float32 (3, img_size, img_size)}.
    """
    timm_transform = create_transform(
        img_size,
        is_training=True,
        scale=data_cfg.crop_scale,
        hflip=data_cfg.hflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment or None,
        interpolation=data_cfg.interpolation,
        mean=data_cfg.mean,
        std=data_cfg.std,
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
    )
    for step in timm_transform.transforms:
        for op in getattr(step, "ops", []):  # RandAugment's operations
            if op.aug_fn is timm_posterize:
                op.aug_fn = posterize
    return View("images", v2.Compose([v2.ToPILImage(), timm_transform]))


def posterize(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's RandAugment posterize, keeping its meaning at 0 bits (the top magnitude of the
    'inc1' policy): a black image, as Pillow < 13 gave. Pillow 13 raises for bits < 1, which would
    stop a DeiT run at a random image (about 1 in 700 with rand-m9-mstd0.5-inc1)."""
    if bits_to_keep < 1:
        return Image.new(image.mode, image.size)
    return timm_posterize(image, bits_to_keep, **kwargs)


@dataclass(frozen=True)
class GaussianBlur:
    """With probability p, blur with sigma ~ U(0.1, 2): PIL's own filter on PIL images, as DINO
    does (torchvision's blur converts PIL images to tensors and convolves, ~10x slower), else
    torchvision's with a +-3 sigma kernel. Draws from the torch RNG (seeded per item)."""

    p: float

    def __call__(self, image: Any) -> Any:
        if torch.rand(()) >= self.p:
            return image
        sigma = float(torch.empty(()).uniform_(0.1, 2.0))
        if isinstance(image, Image.Image):
            return image.filter(ImageFilter.GaussianBlur(radius=sigma))
        return v2.functional.gaussian_blur(image, [13, 13], [sigma, sigma])


@dataclass(frozen=True)
class Crops:
    """image -> [t(image) for t in transforms]; a class so that it pickles into loader workers."""

    transforms: tuple[Callable[[Any], Any], ...]

    def __call__(self, image: Any) -> list[Any]:
        return [t(image) for t in self.transforms]


def multi_crop(
    data_cfg: DataConfig,
    global_size: int,
    local_size: int,
    local_crops: int,
    global_scale: tuple[float, float],
    local_scale: tuple[float, float],
) -> View:
    """DINO's multi-crop view: 2 global crops then `local_crops` local crops, each a random
    resized crop, flip, colour jitter (0.4, 0.4, 0.2, 0.1; p 0.8), grayscale (p 0.2) and Gaussian
    blur (sigma 0.1-2; p 1.0 / 0.1 on the globals, 0.5 on the locals); solarisation (p 0.2) on the
    second global only.

    image -> {"crops": [2 x float32 (3, global_size, global_size),
                        local_crops x float32 (3, local_size, local_size)]}, normalised.
    """

    def crop(size: int, scale: tuple[float, float], blur: float, solarize: float = 0.0) -> Any:
        return v2.Compose(
            [
                v2.RandomResizedCrop(
                    size, scale=scale, interpolation=data_cfg.interpolation, antialias=True
                ),
                v2.RandomHorizontalFlip(data_cfg.hflip),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(0.2),
                GaussianBlur(blur),
                v2.RandomSolarize(128, p=solarize),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(data_cfg.mean, data_cfg.std),
                v2.ToPureTensor(),
            ]
        )

    local = crop(local_size, local_scale, blur=0.5)
    return View(
        "crops",
        Crops(
            (
                crop(global_size, global_scale, blur=1.0),
                crop(global_size, global_scale, blur=0.1, solarize=0.2),
                *[local] * local_crops,
            )
        ),
    )
