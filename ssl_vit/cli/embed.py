"""`ssl-vit embed --checkpoint CHECKPOINT --data.path DIR`: the features of every image of a
folder or dataset split, with ids (the image paths) and labels, written to a .parquet or
.safetensors file (ssl_vit.eval.features); one JSON line saying what was written."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from accelerate import Accelerator

from ssl_vit.cli.runner import Args, run_command
from ssl_vit.config import (
    Config,
    ConfigError,
    EvalDataConfig,
    ModelConfig,
    TrainConfig,
    field_errors,
)
from ssl_vit.eval.accuracy import eval_loader
from ssl_vit.eval.features import dataset_features, write_features
from ssl_vit.weights import CHECKPOINT_HELP, LoadConfig, load_pretrained

log = logging.getLogger("ssl_vit")

NAMED = 20
"""Unreadable images the JSON line names (stderr names every one)."""


@dataclass
class EmbedConfig:
    output: str = "embeddings.parquet"
    """File to write: .parquet (columns id, label, embedding) or .safetensors (embeddings,
    labels; the ids in its metadata)."""
    pool: Literal["cls", "avgpool", "cls_avgpool"] = "cls"
    """cls: the cls token (of the last n_last blocks, concatenated); avgpool: the mean patch
    token; cls_avgpool: both."""
    n_last: int = 1
    """Blocks whose cls tokens are concatenated (pool cls / cls_avgpool)."""
    normalize: bool = False
    """L2-normalise each feature (what k-NN and retrieval compare)."""
    batch_size: int = 64
    """Images per device per forward pass."""
    img_size: int = 0
    """Resolution (resize to img_size / 0.875, centre crop); 0 = the backbone's own."""

    def errors(self) -> list[str]:
        e = field_errors(self, "embed", {">= 1": "n_last batch_size", ">= 0": "img_size"})
        if not self.output.endswith((".parquet", ".safetensors")):
            e.append(f"embed.output: a .parquet or .safetensors file, got {self.output!r}")
        return e


@dataclass
class EmbedRoot:
    """What `ssl-vit embed` runs: the images (data.split of data.path: a flat folder is all its
    images), the features and how the checkpoint's backbone is loaded."""

    embed: EmbedConfig = field(default_factory=EmbedConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    load: LoadConfig = field(default_factory=LoadConfig)


def embed(root: EmbedRoot, args: Args) -> dict[str, Any]:
    """Check the options, load the backbone, compute and write the features."""
    c, checkpoint = root.embed, args["--checkpoint"]
    e = c.errors() + root.data.errors() + root.load.errors()
    if not checkpoint:
        e.append("--checkpoint: required (a run directory, a checkpoint file or NAME=PATH)")
    if e:
        raise ConfigError(e)
    backbone = load_pretrained(checkpoint, model=root.load.model(), which=root.load.which)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    size = c.img_size or backbone.grid_size[0] * backbone.patch_size
    cfg = Config(
        model=ModelConfig(name=backbone.name, img_size=size),
        data=root.data,
        train=TrainConfig(batch_size=c.batch_size),
    )
    loader = eval_loader(cfg, root.data.split, accelerator)
    feats, labels, ids, skipped = dataset_features(
        backbone.to(accelerator.device).eval(), loader, accelerator, c.pool, c.n_last, c.normalize
    )
    if accelerator.is_main_process:
        write_features(c.output, feats, labels, ids)
        for path in skipped:
            log.warning("skipped unreadable image %s (left out of %s)", path, c.output)
    return {
        "checkpoint": checkpoint,
        "output": c.output,
        "images": len(ids),
        "dim": feats.shape[1],
        "labeled": bool((labels >= 0).all()),
        "skipped_images": len(skipped),
        "skipped_paths": skipped[:NAMED],
    }


def main(argv: list[str]) -> int:
    """`ssl-vit embed --checkpoint C [--embed.output F.parquet --data.path DIR ...]`."""
    return run_command(
        lambda args: EmbedRoot(), argv, "ssl-vit embed --checkpoint CHECKPOINT", embed,
        flags={"--checkpoint": ""}, help_extra="\n\n" + CHECKPOINT_HELP,
    )  # fmt: skip
