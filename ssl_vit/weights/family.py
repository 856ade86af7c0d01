"""What one official checkpoint family declares: how its files' keys map to timm's names. Each
family is one module of this package holding one `Family`; load.FAMILIES lists them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ssl_vit.backbone import PosInterp

State = dict[str, Tensor]
WRAPPERS = ("module.", "backbone.")
"""Prefixes of wrapped networks (DDP's `module.`, a training checkpoint's `backbone.`)."""


@dataclass(frozen=True)
class Family:
    """One official checkpoint family's key map.

    dropped: regex alternatives of the keys (timm names, after `to_timm`) that hold method state,
      not the backbone; every family's are dropped from every file.
    detect: whether an unwrapped state dict is in this family's own layout, which `to_timm`
      converts; None for families whose files already carry timm's names.
    to_timm: the official state in timm's names (called only on detected files).
    interp: the position-embedding formula the official code fixes for a detected file.
    infer: (timm name, kwargs) of a converted state, for families built on a timm model other than
      the VisionTransformer timm_vit.infer_architecture reads (num_heads: 0 = from the width).
    """

    name: str
    dropped: str = ""
    detect: Callable[[State], bool] | None = None
    to_timm: Callable[[State], State] | None = None
    interp: Callable[[State], PosInterp | None] | None = None
    infer: Callable[[State, int], tuple[str, dict[str, Any]]] | None = None


def unwrapped(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with its `module.` / `backbone.` wrapper prefixes stripped."""
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPERS):
            key = key.split(".", 1)[1]
        out[key] = value
    return out
