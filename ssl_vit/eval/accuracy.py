"""Evaluation data, loaders and top-k accuracy, shared by the trainer's monitor, the evaluators and
`ssl-vit knn`: what an evaluation will read is checked before any work (`eval_data`), and passes
over it show a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.data_loader import prepare_data_loader
from torch import Tensor

from ssl_vit.config import Config
from ssl_vit.data import DataError, build_dataset, build_loader, eval_split, eval_view
from ssl_vit.eval.features import progress


@dataclass
class EvalData:
    """What an evaluation reads, checked: `split` of the data, labeled by `classes` (the training
    split's class names); `held_out` False when it is the training split itself."""

    split: str
    classes: list[str]
    held_out: bool

    def result(self) -> dict[str, Any]:
        """What results say about the data they were measured on."""
        return {"eval_split": self.split, "held_out": self.held_out}


def eval_data(cfg: Config, what: str) -> EvalData:
    """Check, before any training step or feature, the data an evaluation of `what` ('k-NN' or
    'top-1') will read: the evaluation split (data.val_split; 'auto' resolved) exists apart from
    the training data unless named as data.split, is labeled, and its classes are the training
    split's; k-NN also needs the training split (its bank) labeled. DataError says which."""
    d = cfg.data
    split = eval_split(d)
    view = eval_view(d, cfg.model.img_size)
    size = cfg.model.img_size
    train = build_dataset(d, view, seed=cfg.train.seed, image_size=size)
    if not train.classes:
        raise DataError(
            f"{what} evaluation needs labels: the training split {d.split!r} (data.split) of "
            f"{d.path} has none (class sub-folders, or data.label_column)"
        )
    held = build_dataset(d, view, split, seed=cfg.train.seed, image_size=size,
                         classes=train.classes)  # fmt: skip
    if not held.classes:
        raise DataError(
            f"{what} evaluation needs labels: split {split!r} (data.val_split) of {d.path} has none"
        )
    if held.classes != train.classes[: len(held.classes)]:  # Hugging Face ids: a prefix
        raise DataError(
            f"split {split!r} (data.val_split) of {d.path} has other classes than the training "
            f"split {d.split!r}: {held.classes[:10]} vs {train.classes[:10]}"
        )
    return EvalData(split, list(train.classes), split != d.split)


def eval_loader(
    cfg: Config,
    split: str,
    accelerator: Any,
    batch_size: int = 0,
    classes: Sequence[str] | None = None,
) -> Any:
    """The `split` of cfg.data through the evaluation view (resize + center crop), in order,
    sharded over the processes, labeled by `classes` when given. Not registered with the
    accelerator, so training checkpoints never depend on which evaluations ran."""
    dataset = build_dataset(
        cfg.data,
        eval_view(cfg.data, cfg.model.img_size),
        split,
        seed=cfg.train.seed,
        image_size=cfg.model.img_size,
        classes=classes,
    )
    return sharded_in_order(dataset, cfg, accelerator, batch_size or cfg.train.batch_size)


def sharded_in_order(dataset: Any, cfg: Config, accelerator: Any, batch_size: int) -> Any:
    """An evaluation loader of `dataset`: in order, all of it, sharded over the processes, on
    the device."""
    loader = build_loader(
        dataset,
        batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
        seed=cfg.train.seed,
    )
    return prepare_data_loader(
        loader,
        accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
    )


DECIMALS = 3
"""Decimals of an accuracy in % as reported (JSON lines, metrics.jsonl, logs)."""


def percent(hits: int | Tensor, total: int) -> float:
    """`hits` of `total` in %, from the integer counts in float64, rounded to DECIMALS: 3 of 10
    is 30.0 (a float32 mean gave 30.000001907348633)."""
    return round(100.0 * int(hits) / total, DECIMALS)


@torch.no_grad()
def classification_metrics(
    predict: Callable[[Tensor], Tensor], loader: Any, accelerator: Any
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of `predict`: images (B, C, H, W) -> logits (B, classes), or
    (B, heads, classes) for several heads over the same images (a linear probe's lr grid), over
    every image of `loader` once (the padding of uneven shards is dropped by the gather).

    With several heads: top1/top5 of the head with the best top-1 (the first on ties), `head` its
    index, and top1_h{i}/top5_h{i} of every head i."""
    correct1 = correct5 = count = 0
    for batch in progress(loader, accelerator, "top-1"):
        with accelerator.autocast():
            logits = predict(batch["images"])
        logits, labels = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
        if (labels < 0).any():
            raise DataError("accuracy needs a labeled split; this one has unlabeled images")
        logits = logits if logits.ndim == 3 else logits[:, None]  # (B, heads, classes)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += (top[..., 0] == labels[:, None]).sum(dim=0)
        correct5 += (top == labels[:, None, None]).any(dim=-1).sum(dim=0)
        count += len(labels)
    best = int(correct1.argmax())  # the first on ties
    out = {"top1": percent(correct1[best], count), "top5": percent(correct5[best], count)}
    if len(correct1) > 1:
        out["head"] = best
        for i in range(len(correct1)):
            out[f"top1_h{i}"] = percent(correct1[i], count)
            out[f"top5_h{i}"] = percent(correct5[i], count)
    return out
