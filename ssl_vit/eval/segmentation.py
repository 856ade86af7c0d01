"""Semantic segmentation scoring: the confusion matrix over a whole split, mIoU / mean class
accuracy / pixel accuracy as mmsegmentation defines them, sliding-window and whole-image
inference, multi-scale + flip test. Plain torch (the evaluation pass over a split, which
needs Accelerate, is segmentation_eval.py).

mmsegmentation's definition: per class, IoU = intersection / union and accuracy = intersection /
label area, each summed over every image of the split first; a class whose union (for IoU) or
label area (for accuracy) is 0 is NaN and left out of the mean; pixel accuracy = all
intersections / all labelled pixels. Pixels labelled IGNORE_INDEX count nowhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_vit.data import DataError
from ssl_vit.data.segmentation import IGNORE_INDEX

Logits = Callable[[Tensor], Tensor]
"""images (B, C, h, w) -> per-pixel logits (B, K, h, w) at the images' own size."""


def confusion(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """pred, label (...) class ids -> (K, K) int64 counts, rows the label, columns the
    prediction; pixels labelled IGNORE_INDEX left out. A label >= K is an error."""
    keep = label != IGNORE_INDEX
    label, pred = label[keep].long(), pred[keep].long()
    if label.numel() and int(label.max()) >= num_classes:
        raise DataError(f"label {int(label.max())} outside the {num_classes} classes")
    idx = label * num_classes + pred
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(conf: Tensor) -> dict[str, Any]:
    """(K, K) confusion -> {"miou", "macc", "pixel_acc"}, and per class "iou", "acc" (NaN where
    undefined), "label_area", "pred_area"; fractions in float64 (NaN when nothing is defined)."""
    conf = conf.double()
    inter, label_area, pred_area = conf.diag(), conf.sum(1), conf.sum(0)
    union = label_area + pred_area - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.nan)
    acc = torch.where(label_area > 0, inter / label_area.clamp_min(1), torch.nan)
    total = float(label_area.sum())

    def mean(x: Tensor) -> float:
        x = x[~x.isnan()]
        return float(x.mean()) if len(x) else math.nan

    return {
        "miou": mean(iou),
        "macc": mean(acc),
        "pixel_acc": float(inter.sum()) / total if total else math.nan,
        "iou": iou.tolist(),
        "acc": acc.tolist(),
        "label_area": label_area.long().tolist(),
        "pred_area": pred_area.long().tolist(),
    }


def upsample(logits: Tensor, size: Sequence[int]) -> Tensor:
    """(B, K, h, w) -> (B, K, H, W), bilinear (align_corners False); the same when sizes match."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def whole(fn: Logits, images: Tensor, multiple: int) -> Tensor:
    """`fn` on the whole image, padded at the bottom and right to a multiple of `multiple` (the
    patch size) and the logits cropped back -> (B, K, H, W)."""
    h, w = images.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return fn(F.pad(images, (0, pw, 0, ph)))[..., :h, :w]


def slide(fn: Logits, images: Tensor, crop: int, stride: int, multiple: int) -> Tensor:
    """Sliding-window inference (mmsegmentation's slide mode): crop x crop windows every `stride`
    pixels, the last one flush with the border, the logits of overlapping windows averaged ->
    (B, K, H, W). A side shorter than the crop is one window (run as `whole`)."""
    h, w = images.shape[-2:]
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    total = count = None
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * stride, c * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out = whole(fn, images[..., y1:y2, x1:x2], multiple)
            if total is None:
                total = out.new_zeros(*out.shape[:2], h, w)
                count = out.new_zeros(1, 1, h, w)
            total[..., y1:y2, x1:x2] += out
            count[..., y1:y2, x1:x2] += 1
    return total / count


@dataclass
class Inference:
    """How a segmenter is applied to an evaluation image: `mode` slide (crop, stride) or whole;
    with `ratios` (multi-scale test) each ratio of the image's size and its horizontal flip,
    their softmax averaged."""

    mode: str
    crop: int
    stride: int
    multiple: int
    ratios: tuple[float, ...] = ()

    def once(self, fn: Logits, images: Tensor) -> Tensor:
        if self.mode == "slide":
            return slide(fn, images, self.crop, self.stride, self.multiple)
        return whole(fn, images, self.multiple)

    def __call__(self, fn: Logits, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> (B, K, H, W) logits (log-probabilities with ratios)."""
        if not self.ratios:
            return self.once(fn, images)
        size, probs = images.shape[-2:], 0.0
        for ratio in self.ratios:
            scaled = (
                F.interpolate(images, scale_factor=ratio, mode="bilinear", align_corners=False)
                if ratio != 1
                else images
            )
            for flip in (False, True):
                x = scaled.flip(-1) if flip else scaled
                out = self.once(fn, x)
                out = out.flip(-1) if flip else out
                probs = probs + upsample(out.float(), size).softmax(dim=1)
        return (probs / (2 * len(self.ratios))).log()
