"""Data: image folders, Hugging Face and synthetic datasets, per-method views, loaders."""

from ssl_vit.data.datasets import (
    STOP_SIGNALS,
    DataError,
    ImageDataset,
    SkipCounter,
    build_dataset,
    build_loader,
    collate,
    eval_split,
    open_image,
    seeded,
)
from ssl_vit.data.device import (
    DeviceView,
    Encoded,
    EncodedBatch,
    batch_generator,
    decode,
    device_single_view,
    device_view,
    encoded_dataset,
    sample_crops,
)
from ssl_vit.data.shards import write_shards
from ssl_vit.data.streaming import ImageStream, StreamLoader, build_stream
from ssl_vit.data.synthetic import CLASSES as SYNTHETIC_CLASSES
from ssl_vit.data.synthetic import SyntheticImages
from ssl_vit.data.transforms import Crop, View, eval_view, multi_crop, single_view
from ssl_vit.data.workers import check_workers, stop_watching, watch_workers, worker_death

__all__ = [
    "STOP_SIGNALS",
    "Crop",
    "SYNTHETIC_CLASSES",
    "DataError",
    "DeviceView",
    "Encoded",
    "EncodedBatch",
    "ImageDataset",
    "ImageStream",
    "StreamLoader",
    "SkipCounter",
    "SyntheticImages",
    "View",
    "batch_generator",
    "decode",
    "device_single_view",
    "device_view",
    "encoded_dataset",
    "eval_split",
    "eval_view",
    "build_dataset",
    "build_loader",
    "build_stream",
    "write_shards",
    "collate",
    "open_image",
    "sample_crops",
    "seeded",
    "multi_crop",
    "single_view",
    "check_workers",
    "stop_watching",
    "watch_workers",
    "worker_death",
]
