"""The segmentation evaluation pass over a split, shared by the loop's evaluation of `ssl-vit
segprobe`: the split checked before any step, its loader (one image per batch, sharded), the
confusion matrix summed over every image and process, the per-class table."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_vit.config import Config
from ssl_vit.data.segmentation import build_segmentation, seg_eval_split, seg_eval_view
from ssl_vit.eval.accuracy import DECIMALS, EvalData, sharded_in_order
from ssl_vit.eval.features import progress
from ssl_vit.eval.segmentation import Logits, confusion, scores, upsample


@dataclass
class SegReport:
    """An evaluation's result: `metrics` (miou, macc, pixel_acc in %; None when undefined: no
    labelled pixel), the per-class `table`
    rows, and the first `samples` images (pixels in [0, 1]) with their labels and predictions."""

    metrics: dict[str, float]
    table: list[dict[str, Any]]
    samples: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)


def segmentation_data(cfg: Config) -> EvalData:
    """Check, before any step, the split a segmentation evaluation reads (data.val_split; 'auto'
    resolved): it exists and has the training split's classes."""
    d = cfg.data
    split = seg_eval_split(d)
    view = seg_eval_view(d, cfg.model.img_size)
    train = build_segmentation(d, view, image_size=cfg.model.img_size)
    build_segmentation(d, view, split, image_size=cfg.model.img_size, classes=train.classes)
    return EvalData(split, list(train.classes), split != d.split)


def segmentation_loader(cfg: Config, split: str, accelerator: Any, classes: list[str]) -> Any:
    """The `split` through the evaluation view, one image per batch (sizes differ), in order,
    sharded over the processes."""
    dataset = build_segmentation(
        cfg.data,
        seg_eval_view(cfg.data, cfg.model.img_size),
        split,
        image_size=cfg.model.img_size,
        classes=classes,
    )
    return sharded_in_order(dataset, cfg, accelerator, 1)


@torch.no_grad()
def segmentation_metrics(
    predict: Logits,
    loader: Any,
    accelerator: Any,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    samples: int = 4,
) -> SegReport:
    """Score `predict` (images -> logits at the images' size) on every image of `loader` once:
    logits upsampled bilinearly to the mask's size, argmax, one confusion matrix over the split
    (the padding of uneven shards dropped by the gather)."""
    k = len(classes)
    conf = torch.zeros(k, k, dtype=torch.long, device=accelerator.device)
    kept = []
    for batch in progress(loader, accelerator, "mIoU"):
        with accelerator.autocast():
            logits = predict(batch["images"])
        masks = batch["masks"]
        pred = upsample(logits.float(), masks.shape[-2:]).argmax(dim=1)
        per_image = torch.stack([confusion(p, m, k) for p, m in zip(pred, masks, strict=True)])
        conf += accelerator.gather_for_metrics(per_image).sum(0)
        if len(kept) < samples:
            pixels = batch["images"][0].float().cpu()
            pixels = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
            size = masks.shape[-2:]
            pixels = F.interpolate(pixels[None], size=tuple(size), mode="bilinear")[0]
            kept.append((pixels.clamp(0, 1), masks[0].cpu(), pred[0].cpu()))
    s = scores(conf.cpu())
    table = [
        {
            "class": name,
            "iou": _pct(s["iou"][i]),
            "acc": _pct(s["acc"][i]),
            "label_pixels": s["label_area"][i],
            "predicted_pixels": s["pred_area"][i],
        }
        for i, name in enumerate(classes)
    ]
    metrics = {key: _pct(s[key]) for key in ("miou", "macc", "pixel_acc")}
    return SegReport(metrics, table, kept)


def _pct(x: float) -> float | None:
    return None if math.isnan(x) else round(100 * x, DECIMALS)


def write_table(path: str | Path, table: list[dict[str, Any]]) -> None:
    """The per-class rows as CSV (IoU and accuracy in %, empty where the class is absent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
