"""Data: image folders, Hugging Face and synthetic datasets, per-method views, loaders."""

from ssl_vit.data.datasets import (
    DataError,
    ImageDataset,
    SkipCounter,
    build_dataset,
    build_loader,
    collate,
    open_image,
    seeded,
)
from ssl_vit.data.synthetic import CLASSES as SYNTHETIC_CLASSES
from ssl_vit.data.synthetic import SyntheticImages
from ssl_vit.data.transforms import View, eval_view, single_view

__all__ = [
    "SYNTHETIC_CLASSES",
    "DataError",
    "ImageDataset",
    "SkipCounter",
    "SyntheticImages",
    "View",
    "eval_view",
    "build_dataset",
    "build_loader",
    "collate",
    "open_image",
    "seeded",
    "single_view",
]
