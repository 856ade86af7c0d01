"""Images in and out of the visualisations: files and dataset samples as normalised model inputs,
and normalised tensors back to displayable pixels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torchvision.transforms import v2

from ssl_vit.config import ConfigError, EvalDataConfig
from ssl_vit.data import DataError, build_dataset, eval_split, eval_view, open_image


def to_pixels(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(..., C, H, W) normalised as (x - mean) / std per channel -> displayable values in [0, 1]."""
    shape = (-1, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x * s + m).clamp(0, 1)


def load_image(
    path: str | Path, short_side: int, patch_size: int, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """An image file -> (1, 3, H, W) normalised: short side resized to `short_side` (bicubic),
    aspect kept, then centre-cropped to multiples of the patch (as DINO's visualize_attention)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    image = v2.Compose(
        [
            v2.Resize(short_side, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )(open_image(path))
    h, w = (s - s % patch_size for s in image.shape[-2:])
    if not h or not w:
        raise ValueError(f"{path}: smaller than one {patch_size}px patch after resizing")
    return v2.Normalize(mean, std)(v2.CenterCrop((h, w))(image))[None]


def load_images(
    paths: str, size: int, patch_size: int, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """Comma-separated image files -> (n, 3, size, size) normalised: each short side resized to
    `size`, centre-cropped square (the grid a model with a fixed position embedding needs)."""
    images = [load_image(p.strip(), size, patch_size, mean, std) for p in paths.split(",")]
    return torch.cat([v2.CenterCrop(size)(x) for x in images])


def picture_split(data_cfg: EvalDataConfig) -> str:
    """The split pictures show: the evaluation split when the data has one, else the training
    split (a picture measures nothing, so a folder of photos is fine as it is)."""
    try:
        return eval_split(data_cfg)
    except (DataError, ConfigError):  # no held-out split
        return data_cfg.split


def dataset_images(data_cfg: EvalDataConfig, n: int, img_size: int, split: str = "") -> Tensor:
    """The first n images (n, 3, img_size, img_size) of a split (default `picture_split`)
    through the evaluation view (resize, centre crop, normalise): a fixed, deterministic set."""
    split = split or picture_split(data_cfg)
    dataset = build_dataset(data_cfg, eval_view(data_cfg, img_size), split, image_size=img_size)
    if len(dataset) < n:
        raise DataError(
            f"split {split!r} of {data_cfg.path!r} has {len(dataset)} images; {n} asked"
        )
    return torch.stack([dataset[i]["images"] for i in range(n)])
