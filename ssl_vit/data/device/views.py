"""The batched device views: `DeviceView` turns a collated batch of encoded images into the batch
the CPU view of transforms.py would have given (decode, crops, RandAugment, normalisation,
erasing), and `device_view`, `device_single_view`, `device_supervised_view` build one from a
DataConfig, as the methods build their CPU views.

Why: the one entry point the trainer and bench call (`DeviceView.apply`); the steps it chains live
in the modules below it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from ssl_vit.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError, DataConfig
from ssl_vit.data.datasets import DataError
from ssl_vit.data.device.colour import apply_to
from ssl_vit.data.device.crops import CropParams, augment_crop, resized_crops, sample_params
from ssl_vit.data.device.decoding import decode
from ssl_vit.data.device.randaugment import DeviceRandAugment, draw_erasing, erase
from ssl_vit.data.encoded_batch import EncodedBatch
from ssl_vit.data.transforms import Crop


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (B, 3, H, W) -> float32, (x / 255 - mean) / std per channel."""
    return F.normalize(
        F.to_dtype(x, torch.float32, scale=True), list(mean), list(std), inplace=True
    )


@dataclass(frozen=True)
class DeviceView:
    """A view of transforms.py run on a batch on the device: each of `crops` drawn per image.
    key "images" with one crop = `single_view` (a tensor), with `randaugment` and `reprob` =
    `supervised_view`; key "crops" = `multi_crop` (a list)."""

    key: str
    crops: tuple[Crop, ...]
    interpolation: str = "bicubic"
    hflip: float = 0.5
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    randaugment: DeviceRandAugment | None = None
    """timm's RandAugment after the crop (DeiT's `supervised_view`)."""
    reprob: float = 0.0
    """timm's random erasing after the normalisation, with this probability."""

    def __post_init__(self) -> None:
        if self.key not in ("images", "crops") or (self.key == "images") != (len(self.crops) == 1):
            raise ValueError(
                f"DeviceView: key 'images' takes one crop, 'crops' several; got "
                f"{self.key!r} with {len(self.crops)}"
            )

    def params(self, images: Sequence[Tensor], generator: torch.Generator) -> list[CropParams]:
        """Each crop's draws for `images`, on the host generator."""
        sizes = torch.tensor([list(im.shape[-2:]) for im in images])
        return [sample_params(c, sizes, self.hflip, generator) for c in self.crops]

    def __call__(
        self, images: Sequence[Tensor], generator: torch.Generator
    ) -> Tensor | list[Tensor]:
        """images uint8 (3, H_k, W_k) -> float32 (B, 3, s, s) per crop, normalised; then the
        twin (B, 3, t, t) of each crop that has one (`Crop.twin`: its box and flip alone)."""
        out, twins = [], []
        for crop, p in zip(self.crops, self.params(images, generator), strict=True):
            if crop.twin:
                twin = resized_crops(images, p.boxes, crop.twin, self.interpolation)
                apply_to(twin, p.flip, F.horizontal_flip)
                twins.append(normalize(twin, self.mean, self.std))
            x = augment_crop(images, crop, p, self.interpolation)
            seeds = torch.randint(2**62, (3,), generator=generator).tolist()
            if self.randaugment is not None:
                x = self.randaugment(x, seeds[0])
            x = normalize(x, self.mean, self.std)
            if self.reprob:
                boxes = draw_erasing(len(x), crop.size, crop.size, self.reprob, seeds[1])
                noise = torch.Generator(x.device).manual_seed(seeds[2])
                x = erase(x, boxes, noise)
            out.append(x)
        return out + twins if self.key == "crops" else out[0]

    def apply(
        self, batch: dict[str, Any], generator: torch.Generator, device: torch.device | str
    ) -> dict[str, Any]:
        """A collated batch of the encoded dataset -> the batch the CPU view would have given:
        "encoded" decoded on `device` and augmented into `key`; the paths of bytes that do not
        decode are added to "skipped" and their slots (image and label) filled by the next
        decodable image of the batch, as ImageDataset does for unreadable files."""
        batch = dict(batch)
        encoded: EncodedBatch = batch.pop("encoded")
        images = decode([encoded[k] for k in range(len(encoded))], device)
        good = [k for k, im in enumerate(images) if im is not None]
        if not good:
            raise DataError(f"no image of a batch could be decoded: {encoded.paths}")
        if len(good) < len(images):
            bad = [k for k, im in enumerate(images) if im is None]
            src = [next((g for g in good if g > k), good[0]) for k in bad]
            for k, g in zip(bad, src, strict=True):
                images[k] = images[g]
            labels = batch["labels"].clone()
            labels[torch.tensor(bad)] = labels[torch.tensor(src)]
            batch["labels"] = labels
            batch["skipped"] = [*batch.get("skipped", []), *(encoded.paths[k] for k in bad)]
        batch[self.key] = self(images, generator)  # type: ignore[arg-type]
        return batch


def device_view(data_cfg: DataConfig, key: str, crops: Sequence[Crop]) -> DeviceView:
    """The device counterpart of a view of `crops` with data_cfg's interpolation, flip and
    normalisation."""
    return DeviceView(
        key,
        tuple(crops),
        data_cfg.interpolation,
        data_cfg.hflip,
        tuple(data_cfg.mean),
        tuple(data_cfg.std),
    )


def device_supervised_view(
    data_cfg: DataConfig, img_size: int, auto_augment: str, color_jitter: float, re_prob: float
) -> DeviceView:
    """The device counterpart of `supervised_view` (DeiT, fine-tuning): crop and flip, timm's
    RandAugment `auto_augment` (a "rand-..." policy), normalisation, random erasing."""
    if not auto_augment.startswith("rand") and (auto_augment or color_jitter):
        raise ConfigError(
            [
                f"data.decode_on_device: method.auto_augment {auto_augment!r} with "
                f"method.color_jitter {color_jitter}: the device view runs RandAugment policies "
                f"('rand-...') only, or no augmentation ('' with color_jitter 0)"
            ]
        )
    randaugment = None
    if auto_augment:
        randaugment = DeviceRandAugment(
            auto_augment, img_size, data_cfg.interpolation, tuple(data_cfg.mean)
        )
    view = device_single_view(data_cfg, img_size)
    return dataclasses.replace(view, randaugment=randaugment, reprob=re_prob)


def device_single_view(data_cfg: DataConfig, img_size: int) -> DeviceView:
    """The device counterpart of `single_view(data_cfg, img_size)`."""
    return device_view(data_cfg, "images", [Crop(img_size, tuple(data_cfg.crop_scale))])
