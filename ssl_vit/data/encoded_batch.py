"""The host containers of the device data path: one image's encoded bytes (`Encoded`) and a batch of
them packed in one tensor (`EncodedBatch`).

Why here: `datasets.collate` packs "encoded" items into an `EncodedBatch`, and `data.device`
builds on `datasets`; keeping the containers in this module, which imports no other ssl_vit
module, lets both import them without a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Encoded:
    """One image's encoded file bytes, uint8 (N,), and where they come from (for skip logs).

    No `.to` method on purpose: Accelerate's device placement leaves it (and its bytes) on the
    host, where `decode_jpeg` wants its input even when decoding on the GPU.
    """

    data: Tensor
    path: str


@dataclass(frozen=True)
class EncodedBatch:
    """A batch's encoded images packed in one flat uint8 tensor, image k being
    data[offsets[k]:offsets[k + 1]], with their paths.

    One tensor, because a loader worker hands each tensor storage over as its own shared-memory
    file descriptor: a list of B small tensors per batch fails ("Bad file descriptor"). Host-only
    like `Encoded` (no `.to`); `pin_memory` is honoured for faster copies to nvJPEG.
    """

    data: Tensor
    offsets: list[int]
    paths: list[str]

    @classmethod
    def pack(cls, items: Sequence[Encoded]) -> EncodedBatch:
        sizes = [it.data.numel() for it in items]
        offsets = [0, *np.cumsum(sizes).tolist()]
        return cls(torch.cat([it.data for it in items]), offsets, [it.path for it in items])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> Tensor:
        """Image k's bytes, uint8 (N_k,), a view."""
        return self.data[self.offsets[k] : self.offsets[k + 1]]

    def pin_memory(self) -> EncodedBatch:
        return EncodedBatch(self.data.pin_memory(), self.offsets, self.paths)
