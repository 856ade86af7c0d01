"""Per-method views: a view maps one image (PIL or uint8 tensor (3, H, W)) to a dict of tensors.

The keys are the batch contract (DESIGN.md § Batch): "images" for a single view (MAE, DeiT),
"crops" for a multi-crop one (DINO). `data.device` holds their batched device counterparts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageFilter
from timm.data import create_transform
from timm.data.auto_augment import posterize as timm_posterize
from torchvision.transforms import RandomResizedCrop, v2

from ssl_vit.config import DataConfig, EvalDataConfig


@dataclass(frozen=True)
class View:
    """image -> {key: transform(image)}.

    A class rather than a closure so that a dataset holding it pickles into spawned loader workers.
    """

    key: str
    transform: Callable[[Any], Any]

    def __call__(self, image: Any) -> dict[str, Any]:
        return {self.key: self.transform(image)}


JITTER = (0.4, 0.4, 0.2, 0.1)
"""DINO's colour-jitter strengths: brightness, contrast, saturation, hue."""


BLUR_SIGMA = (0.1, 2.0)
"""Range of DINO's Gaussian-blur sigma (pixels)."""
BLUR_KERNEL = 13
"""Side of the blur kernel on tensor images: +-3 sigma at the largest sigma."""


@dataclass(frozen=True)
class Crop:
    """One crop of a multi-crop view: a random resized crop to `size` (area fraction in `scale`),
    a flip, then DINO's photometric augmentations, each applied with its probability: colour
    jitter (JITTER, in a random order), grayscale, Gaussian blur (sigma ~ U(0.1, 2)), solarisation
    (threshold 128). The CPU view (`multi_crop`) and the device one (`data.device`) both read it."""

    size: int
    scale: tuple[float, float]
    jitter: float = 0.0
    grayscale: float = 0.0
    blur: float = 0.0
    solarize: float = 0.0
    twin: int = 0
    """Side of a second view of the same crop (box and flip) without the photometric steps,
    which a multi-crop view puts after all the crops; 0: none. DINOv3's Gram teacher sees its
    global crops so, at a higher resolution (the official gram_teacher_no_distortions)."""


@dataclass(frozen=True)
class GaussianBlur:
    """With probability p, blur with sigma ~ U(BLUR_SIGMA): PIL's own filter on PIL images, as
    DINO does (torchvision's blur converts PIL images to tensors and convolves, ~10x slower), else
    torchvision's with a BLUR_KERNEL kernel. Draws from the torch RNG (seeded per item)."""

    p: float

    def __call__(self, image: Any) -> Any:
        if torch.rand(()) >= self.p:
            return image
        sigma = float(torch.empty(()).uniform_(*BLUR_SIGMA))
        if isinstance(image, Image.Image):
            return image.filter(ImageFilter.GaussianBlur(radius=sigma))
        return v2.functional.gaussian_blur(image, [BLUR_KERNEL] * 2, [sigma, sigma])


def crop_transform(crop: Crop, data_cfg: DataConfig) -> v2.Compose:
    """image -> float32 (3, crop.size, crop.size), normalised."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                crop.size,
                scale=crop.scale,
                interpolation=v2.InterpolationMode(data_cfg.interpolation),
                antialias=True,
            ),
            v2.RandomHorizontalFlip(data_cfg.hflip),
            *photometric(crop, data_cfg),
        ]
    )


def photometric(crop: Crop, data_cfg: DataConfig) -> list[Callable[[Any], Any]]:
    """The steps after the crop and flip: `crop`'s augmentations, then to a normalised float32
    tensor (only the latter for a Crop without augmentations)."""
    return [
        v2.RandomApply([v2.ColorJitter(*JITTER)], p=crop.jitter),
        v2.RandomGrayscale(crop.grayscale),
        GaussianBlur(crop.blur),
        v2.RandomSolarize(128, p=crop.solarize),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(data_cfg.mean, data_cfg.std),
        v2.ToPureTensor(),
    ]


@dataclass(frozen=True)
class TwinCrop:
    """image -> (crop, twin): one random resized crop box and flip, resized to crop.size and
    augmented as `crop_transform`, and resized to crop.twin with no photometric step. The box
    is resized once to each size (the official crops at the larger and resizes that again)."""

    crop: Crop
    data_cfg: DataConfig

    def __call__(self, image: Any) -> tuple[Any, Any]:
        c, d = self.crop, self.data_cfg
        top, left, h, w = RandomResizedCrop.get_params(image, list(c.scale), [3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < d.hflip)
        mode = v2.InterpolationMode(d.interpolation)

        def view(size: int) -> Any:
            x = v2.functional.resized_crop(image, top, left, h, w, [size, size], mode, True)
            return v2.functional.horizontal_flip(x) if flip else x

        steps = photometric(c, d)
        return v2.Compose(steps)(view(c.size)), v2.Compose(steps[-4:])(view(c.twin))


def single_view(data_cfg: DataConfig, img_size: int) -> View:
    """MAE's view: random resized crop (data.crop_scale) + horizontal flip, normalised; one `Crop`
    without photometric augmentations. PIL images are cropped and resized by PIL.

    image -> {"images": float32 (3, img_size, img_size)}, (x / 255 - mean) / std per channel.
    """
    return View("images", crop_transform(Crop(img_size, tuple(data_cfg.crop_scale)), data_cfg))


@dataclass(frozen=True)
class Crops:
    """image -> [t(image) for t in transforms], the twins of `TwinCrop`s after them all; a class
    so that it pickles into loader workers."""

    transforms: tuple[Callable[[Any], Any], ...]

    def __call__(self, image: Any) -> list[Any]:
        out, twins = [], []
        for t in self.transforms:
            x = t(image)
            if isinstance(t, TwinCrop):
                x, twin = x
                twins.append(twin)
            out.append(x)
        return out + twins


def multi_crop(data_cfg: DataConfig, crops: Sequence[Crop]) -> View:
    """A multi-crop view (DINO's: `registry.dino_crops`).

    image -> {"crops": [float32 (3, c.size, c.size) for c in crops] + [float32 (3, c.twin,
    c.twin) for c in crops if c.twin]}, normalised.
    """
    made = (TwinCrop(c, data_cfg) if c.twin else crop_transform(c, data_cfg) for c in crops)
    return View("crops", Crops(tuple(made)))


@dataclass(frozen=True)
class ViewChoice:
    """One of `views` per image, the k-th for `view(image, k)`: the choice a sampler makes per
    training step (samplers.MixedSizes), so that a batch's crops share their sizes."""

    views: tuple[Callable[[Any], dict[str, Any]], ...]

    def __call__(self, image: Any, k: int = 0) -> dict[str, Any]:
        return self.views[k](image)


def eval_view(data_cfg: EvalDataConfig, img_size: int, crop_ratio: float = 0.875) -> View:
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
                    interpolation=v2.InterpolationMode(data_cfg.interpolation),
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
