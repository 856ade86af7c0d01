"""Weighted k-NN classification on frozen features: DINO's protocol (its eval_knn.py).

Every training image's cls feature, L2-normalised, is kept in a bank gathered from all processes;
each validation image takes its k most cosine-similar bank entries, which vote for their labels
with weight exp(similarity / T). Queries stay sharded: each process classifies its own share and
only the per-image hits are gathered.

    ssl-vit knn --checkpoint runs/dino_vits16 [--knn.k 10,20 --data.path /data/imagenet ...]
    ssl-vit knn --checkpoint dino_deitsmall16_pretrain.pth       # any format load_pretrained reads
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config
from ssl_vit.data import DataError
from ssl_vit.eval.accuracy import EvalData, eval_data, eval_loader, percent
from ssl_vit.eval.features import features, progress


def knn_votes(sim: Tensor, neighbor_labels: Tensor, temperature: float, num_classes: int) -> Tensor:
    """sim, neighbor_labels (M, k): each query's neighbours' cosine similarities and labels ->
    (M, num_classes) votes, the per-class sums of exp(sim / temperature)."""
    votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=sim.dtype)
    return votes.scatter_add_(1, neighbor_labels, (sim / temperature).exp())


def knn_hits(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    labels: Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
) -> Tensor:
    """bank (N, D), queries (M, D) L2-normalised; labels (N,), (M,) -> (M, len(ks), 2) bool: for
    each k, whether the label is the top vote and among the top min(5, k) (ties: lower class)."""
    sim, idx = (queries @ bank.T).topk(min(max(ks), len(bank)), dim=1)  # sorted, nearest first
    out = []
    for k in ks:
        votes = knn_votes(sim[:, :k], bank_labels[idx[:, :k]], temperature, num_classes)
        top = votes.argsort(dim=1, descending=True, stable=True)[:, : min(5, k)]
        hit = top == labels[:, None]
        out.append(torch.stack([hit[:, 0], hit.any(dim=1)], dim=-1))
    return torch.stack(out, dim=1)


@torch.no_grad()
def embed(backbone: Backbone, images: Tensor, accelerator: Any) -> Tensor:
    """(B, C, H, W) -> (B, D) L2-normalised float32 cls features."""
    with accelerator.autocast():
        return F.normalize(features(backbone, images).float(), dim=-1)


def knn_eval(
    backbone: Backbone,
    cfg: Config,
    accelerator: Any,
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    data: EvalData | None = None,
) -> dict[str, float]:
    """k-NN top-1 / top-5 accuracy (%) of `backbone` (on accelerator.device): bank = cfg.data.split,
    queries = `data.split` (eval_data(cfg): checked first when not given), both through the
    evaluation view. Keys knn_top1, knn_top5 for ks[0] and knn_top1_k{k}, knn_top5_k{k} for the
    others. The same dict on every process."""
    data = data or eval_data(cfg, "k-NN")
    was_training = backbone.training
    backbone.eval()
    try:
        bank, bank_labels = [], []
        loader = eval_loader(cfg, cfg.data.split, accelerator, classes=data.classes)
        for batch in progress(loader, accelerator, "k-NN bank"):
            gathered = accelerator.gather_for_metrics(
                (embed(backbone, batch["images"], accelerator), batch["labels"])
            )
            bank.append(gathered[0])
            bank_labels.append(gathered[1])
        bank_t, bank_labels_t = torch.cat(bank), torch.cat(bank_labels)
        if (bank_labels_t < 0).any():
            raise DataError(f"k-NN needs a labeled bank; split {cfg.data.split!r} is unlabeled")
        num_classes = len(data.classes)
        hits = []
        loader = eval_loader(cfg, data.split, accelerator, classes=data.classes)
        for batch in progress(loader, accelerator, "k-NN queries"):
            if (batch["labels"] < 0).any():
                raise DataError(f"k-NN needs labels; split {data.split!r} is unlabeled")
            q = embed(backbone, batch["images"], accelerator)
            h = knn_hits(bank_t, bank_labels_t, q, batch["labels"], ks, temperature, num_classes)
            hits.append(accelerator.gather_for_metrics(h))
    finally:
        backbone.train(was_training)
    all_hits = torch.cat(hits)  # (M, len(ks), 2)
    counts, total = all_hits.sum(dim=0).tolist(), len(all_hits)
    out = {}
    for i, k in enumerate(ks):
        suffix = "" if i == 0 else f"_k{k}"
        out[f"knn_top1{suffix}"] = percent(counts[i][0], total)
        out[f"knn_top5{suffix}"] = percent(counts[i][1], total)
    return out
