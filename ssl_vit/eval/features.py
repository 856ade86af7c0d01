"""Frozen features of a backbone, as the k-NN and linear-probe protocols and `ssl-vit embed` read
them.

cls: the last n blocks' cls tokens (each through the final norm), concatenated — n = 1 is the
k-NN and MAE linear-probe feature, n = 4 DINO's ViT-S linear probe. avgpool: the mean of the last
block's patch tokens. cls_avgpool: both, concatenated (DINO's ViT-B linear probe; its eval_linear
interleaves the two vectors element by element, so its official head's columns are a permutation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ssl_vit.backbone import Backbone

Pool = Literal["cls", "avgpool", "cls_avgpool"]


def feature_dim(backbone: Backbone, pool: Pool = "cls", n_last: int = 1) -> int:
    """The width of `features(backbone, ..., pool, n_last)`."""
    d = backbone.embed_dim
    return {"cls": n_last * d, "avgpool": d, "cls_avgpool": (n_last + 1) * d}[pool]


def features(backbone: Backbone, images: Tensor, pool: Pool = "cls", n_last: int = 1) -> Tensor:
    """images (B, C, H, W) -> (B, feature_dim). Gradients flow unless the caller disables them."""
    if not 1 <= n_last <= backbone.depth:
        raise ValueError(f"n_last must be in [1, {backbone.depth}], got {n_last}")
    out = backbone(images, n_last=n_last)
    if pool != "avgpool" and out.num_prefix < 1:
        raise ValueError(f"pool {pool!r} needs a cls token; this backbone has none")
    cls = [layer[:, 0] for layer in out.layers]
    avg = [out.layers[-1][:, out.num_prefix :].mean(dim=1)]
    return torch.cat({"cls": cls, "avgpool": avg, "cls_avgpool": cls + avg}[pool], dim=-1)


def progress(loader: Any, accelerator: Any, desc: str) -> Any:
    """`loader` with a progress bar on the main process (evaluation passes can take minutes)."""
    return tqdm(
        loader, desc=desc, disable=not accelerator.is_main_process, leave=False, dynamic_ncols=True
    )


@torch.no_grad()
def dataset_features(
    backbone: Backbone,
    loader: Any,
    accelerator: Any,
    pool: Pool = "cls",
    n_last: int = 1,
    normalize: bool = False,
) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """The features of every readable image of `loader` (an `eval_loader`, any number of
    processes) -> (features (N, D) float32 on the CPU, labels (N,), ids (N,) the images' paths,
    the paths of the unreadable images left out). An unreadable image is left out, never replaced
    by its neighbour (as training does), so every id names the image its row was computed from."""
    dataset = loader.dataset
    rows, labels, index, keep = [], [], [], []
    for batch in progress(loader, accelerator, "features"):
        with accelerator.autocast():
            f = features(backbone, batch["images"], pool, n_last).float()
        f = F.normalize(f, dim=-1) if normalize else f
        bad = set(batch["skipped"])
        ok = torch.tensor([dataset.source.path(int(i)) not in bad for i in batch["index"]])
        gathered = accelerator.gather_for_metrics(
            (f, batch["labels"], batch["index"], ok.to(f.device))
        )
        for out, part in zip((rows, labels, index, keep), gathered, strict=True):
            out.append(part.cpu())
    keep_t, index_all = torch.cat(keep), torch.cat(index)
    feats, labels_t, index_t = (torch.cat(t)[keep_t] for t in (rows, labels, index))
    ids = [dataset.source.path(int(i)) for i in index_t]
    return feats, labels_t, ids, [dataset.source.path(int(i)) for i in index_all[~keep_t]]


def write_features(path: str | Path, feats: Tensor, labels: Tensor, ids: list[str]) -> None:
    """Write features with their ids and labels (-1: unlabeled): .parquet (columns id, label,
    embedding: a list of float32 per row; pyarrow, which datasets brings) or .safetensors
    (tensors "embeddings" (N, D) and "labels" (N,), the ids as JSON in its metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        ids_json = json.dumps(ids)
        if len(ids_json) > 50_000_000:  # safetensors' header holds at most 100 MB
            raise ValueError(f"{len(ids)} ids are too many for a safetensors header: use .parquet")
        tensors = {"embeddings": feats.contiguous(), "labels": labels.contiguous()}
        save_file(tensors, str(path), metadata={"ids": ids_json})
        return
    import pyarrow as pa  # only for parquet output
    import pyarrow.parquet as pq

    embedding = pa.FixedSizeListArray.from_arrays(
        pa.array(feats.numpy().reshape(-1)), feats.shape[1]
    )
    table = pa.table({"id": ids, "label": labels.numpy(), "embedding": embedding})
    pq.write_table(table, str(path))
