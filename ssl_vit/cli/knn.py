"""`ssl-vit knn --checkpoint CHECKPOINT`: weighted k-NN accuracy of any checkpoint's backbone
(ssl_vit.eval.knn), one JSON line, also written to knn.json beside the checkpoint (a checkpoint
folder's: in its run directory)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from ssl_vit.eval.accuracy import eval_data
from ssl_vit.eval.knn import knn_eval
from ssl_vit.weights import (
    CHECKPOINT_HELP,
    COMPLETE,
    CheckpointError,
    LoadConfig,
    load_pretrained,
    parse_checkpoint,
)


@dataclass
class KNNConfig:
    k: tuple[int, ...] = (20,)
    """Neighbours that vote; several (e.g. 10,20,100,200) give one result each."""
    temperature: float = 0.07
    """Vote weight exp(similarity / temperature)."""
    batch_size: int = 256
    """Images per device per forward pass."""
    img_size: int = 0
    """Evaluation resolution (resize to img_size / 0.875, center crop); 0 = the backbone's own."""

    def errors(self) -> list[str]:
        rules = {"each >= 1": "k", "positive": "temperature batch_size", ">= 0": "img_size"}
        return field_errors(self, "knn", rules)


@dataclass
class KNNRoot:
    """What `ssl-vit knn` runs: the protocol, the labeled data (data.split is the bank,
    data.val_split the queries) and how the checkpoint's backbone is loaded."""

    knn: KNNConfig = field(default_factory=KNNConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    load: LoadConfig = field(default_factory=LoadConfig)


def knn(root: KNNRoot, args: Args) -> dict[str, Any]:
    """Check the options, load the backbone, score it; write knn.json beside the checkpoint."""
    checkpoint = args["--checkpoint"]
    e = root.load.errors()
    if not checkpoint:
        e.append("--checkpoint: required (a run directory, a checkpoint file or NAME=PATH)")
    else:
        try:
            parse_checkpoint(checkpoint)
        except CheckpointError as err:
            e.append(f"--checkpoint: {err}")
    e += root.knn.errors() + root.data.errors()
    if e:
        raise ConfigError(e)
    load = root.load  # DINO's eval_knn.py: its interpolate_pos_encoding at another size
    interp = load.interp("offset", checkpoint)
    backbone = load_pretrained(checkpoint, model=load.model(), which=load.which, pos_interp=interp)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    img_size = root.knn.img_size or backbone.grid_size[0] * backbone.patch_size
    cfg = Config(
        model=ModelConfig(name=backbone.name, img_size=img_size),
        data=root.data,
        train=TrainConfig(batch_size=root.knn.batch_size),
    )
    data = eval_data(cfg, "k-NN")  # before the bank: wrong data fails in seconds, not hours
    metrics = knn_eval(
        backbone.to(accelerator.device), cfg, accelerator, root.knn.k, root.knn.temperature, data
    )
    result = {"checkpoint": checkpoint, "k": list(root.knn.k), **metrics, **data.result()}
    if accelerator.is_main_process:
        result_dir(checkpoint).joinpath("knn.json").write_text(json.dumps(result) + "\n")
    return result


def result_dir(checkpoint: str) -> Path:
    """Where knn.json goes: the checkpoint's directory (a file's folder), or for a training
    checkpoint folder its run directory, since a resume refuses files added to a checkpoint."""
    path, _ = parse_checkpoint(checkpoint)
    folder = path if path.is_dir() else path.parent
    return folder.parent.parent if (folder / COMPLETE).is_file() else folder


def main(argv: list[str]) -> int:
    """`ssl-vit knn --checkpoint C [--knn.k 10,20 --data.path ... --load.which student ...]`."""
    return run_command(
        lambda args: KNNRoot(),
        argv,
        "ssl-vit knn --checkpoint CHECKPOINT",
        knn,
        flags={"--checkpoint": ""},
        help_extra="\n\n" + CHECKPOINT_HELP,
    )
