"""Per-method views: a view maps one image (PIL or uint8 tensor (3, H, W)) to a dict of tensors.

The keys are the batch contract (DESIGN.md § Batch): "images" for a single view (MAE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
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
