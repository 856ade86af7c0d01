"""Decoding a batch of encoded images on the device: nvJPEG in one batched call on CUDA, one by
one (and on the CPU) for other formats or bytes nvJPEG refuses; None where nothing decodes.

Why separate: the one step that depends on the decoder (nvJPEG vs libjpeg-turbo), apart from the
augmentation that follows it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as F

from ssl_vit.data.device.encoded import _quiet, is_jpeg


def _rgb8(image: Tensor) -> Tensor:
    """Decoders give uint16 for 16-bit PNGs; views want uint8 (as PIL's convert("RGB"))."""
    return image if image.dtype == torch.uint8 else F.to_dtype(image, torch.uint8, scale=True)


def decode(data: Sequence[Tensor], device: torch.device | str) -> list[Tensor | None]:
    """Encoded bytes (host uint8 (N,) each) -> RGB uint8 (3, H_k, W_k) on `device`; None where
    the bytes do not decode.

    On CUDA, JPEGs are decoded in one batched nvJPEG call; one bad file fails the whole call, so
    then (and for other formats, e.g. PNG) images are decoded one by one, on the CPU when nvJPEG
    refuses them. On the CPU every image goes through torchvision's `decode_image`.
    """
    device = torch.device(device)
    out: list[Tensor | None] = [None] * len(data)
    with _quiet():
        if device.type == "cuda":
            jpegs = [k for k, d in enumerate(data) if is_jpeg(d)]
            try:
                if jpegs:
                    batch = [data[k] for k in jpegs]
                    decoded = decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)
                    for k, image in zip(jpegs, decoded, strict=True):
                        out[k] = image
            except (RuntimeError, ValueError):
                pass  # find the bad file(s) one by one below
        for k, d in enumerate(data):
            if out[k] is not None:
                continue
            try:
                if device.type == "cuda" and is_jpeg(d):
                    out[k] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
                    continue
            except (RuntimeError, ValueError):
                pass  # e.g. a CMYK or progressive variant nvJPEG refuses: try the CPU decoder
            try:
                out[k] = _rgb8(decode_image(d, mode=ImageReadMode.RGB)).to(device)
            except (RuntimeError, ValueError):
                out[k] = None
    return out
