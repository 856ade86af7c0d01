"""The dataset side of the device data path: items that carry a file's encoded bytes instead of
a decoded image (`EncodedSource`, `encoded_dataset`), read in loader workers, and the byte-level
helpers the decoder shares (`is_jpeg`, `_quiet`).

Why: loader workers only read bytes; decoding and augmentation run batched in the training
process (`decoding`, `views`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torchvision.io import encode_png, read_file
from torchvision.transforms.v2 import functional as F

from ssl_vit.data.datasets import (
    DataError,
    HFImages,
    ImageDataset,
    ImageFiles,
    Source,
)
from ssl_vit.data.encoded_batch import Encoded
from ssl_vit.data.transforms import View


@contextmanager
def _quiet() -> Iterator[None]:
    """torchvision 0.29 warns on every decode/encode call that TorchCodec supersedes it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        yield


def _read(path: str) -> Tensor:
    """A file's bytes -> uint8 (N,)."""
    with _quiet():
        return read_file(path)


def bytes_tensor(obj: Any) -> Tensor:
    """Raw bytes, a path, or a Hugging Face {"bytes", "path"} dict -> uint8 (N,)."""
    if isinstance(obj, dict):
        obj = obj["bytes"] if obj.get("bytes") is not None else obj["path"]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(obj), dtype=torch.uint8)
    return _read(str(obj))


def _png(image: Any) -> Tensor:
    """A decoded image (uint8 (3, H, W) tensor or PIL) -> lossless PNG bytes uint8 (N,)."""
    with _quiet():
        return encode_png(F.pil_to_tensor(image) if not isinstance(image, Tensor) else image)


class EncodedSource:
    """A `Source` whose items are (Encoded, label) instead of decoded images: the file bytes of an
    image folder or Hugging Face dataset; other sources (synthetic) are rendered and stored as
    lossless PNG, so every command also runs in this mode."""

    def __init__(self, source: Source):
        self.source, self.classes = source, source.classes

    def __len__(self) -> int:
        return len(self.source)

    def path(self, i: int) -> str:
        return self.source.path(i)

    def __getitem__(self, i: int) -> tuple[Encoded, int]:
        s = self.source
        if isinstance(s, ImageFiles):
            data, label = _read(s.files[i]), s.labels[i]
        elif isinstance(s, HFImages):
            row = s.ds[i]
            value = row[s.label_column] if s.label_column else None
            data, label = bytes_tensor(row[s.image_column]), -1 if value is None else value
        else:
            image, label = s[i]
            data = _png(image)
        if data.numel() == 0:
            raise DataError(f"{self.path(i)}: empty file")
        return Encoded(data, self.path(i)), int(label)


def keep(x: Any) -> Any:
    """The identity, a module-level function so that the view pickles into loader workers."""
    return x


def encoded_dataset(dataset: ImageDataset) -> ImageDataset:
    """The same images, order and seed as `dataset` (built and probed by `build_dataset`), with
    items {"encoded": Encoded, "labels", "index", "skipped"}; `collate` packs "encoded" into an
    EncodedBatch."""
    out = ImageDataset(EncodedSource(dataset.source), View("encoded", keep), dataset.seed)
    out.set_epoch(dataset.epoch)
    return out


def is_jpeg(data: Tensor) -> bool:
    """JPEG files start with the SOI marker FF D8 FF."""
    return data.numel() >= 3 and data[:3].tolist() == [0xFF, 0xD8, 0xFF]
