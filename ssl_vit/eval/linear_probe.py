"""Linear probing of a frozen backbone: MAE's protocol and DINO's, with an lr grid in one pass.

The backbone is never updated: no gradients, eval mode, features under no_grad. MAE (its
main_linprobe.py): the last cls token through BatchNorm1d(affine=False, eps=1e-6), a linear head
(trunc_normal std 0.01), LARS, 10 warmup epochs. DINO (its eval_linear.py): the last 4 blocks' cls
tokens concatenated below ViT-B's width, the last cls token + the average-pooled patch tokens from
it; SGD momentum 0.9, lr 1e-3 x batch/256, no weight decay. Both train on RandomResizedCrop
(0.08-1) + flip and evaluate top-1/top-5 on resize + center crop (256 -> 224, scaled to the size).

Beyond the originals, `method.lr_grid` trains one head per learning rate in the same pass over the
same features (each head its own param group, lr_scale = its grid value): one run replaces an lr
sweep, and the best head is reported with every head's accuracy.

    ssl-vit linprobe --checkpoint runs/mae_vitb --protocol mae [--section.field value ...]
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.checkpoint import CHECKPOINT_HELP, CheckpointError, load_pretrained
from ssl_vit.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    help_text,
    parse_args,
    pop_flag,
)
from ssl_vit.data import DataError, build_dataset, eval_view
from ssl_vit.eval.features import Pool, feature_dim, features

VIT_B_WIDTH = 768
"""DINO's linear eval reads the last 4 cls tokens below this width (ViT-S), cls + avgpool from
it (ViT-B)."""


@dataclass
class LinearProbeConfig:
    name: ClassVar[str] = "linprobe"
    checkpoint: str = ""
    """The pretrained backbone: a run directory, a backbone.safetensors, an official MAE / DINO /
    DeiT .pth, a timm-named state dict or NAME=PATH (`--checkpoint` sets it)."""
    which: Literal["teacher", "student"] = "teacher"
    """Network of a DINO training checkpoint whose backbone is probed."""
    protocol: Literal["mae", "dino"] = "mae"
    """Whose features 'auto' reads (`ssl-vit linprobe --protocol` also sets its optimisation)."""
    pool: Literal["auto", "cls", "avgpool", "cls_avgpool"] = "auto"
    """Features: cls (the last n_last blocks' cls tokens, concatenated), avgpool (mean patch
    token), cls_avgpool (both). auto: mae -> cls; dino -> cls below ViT-B's width, else
    cls_avgpool."""
    n_last: int = 0
    """Blocks whose cls tokens are concatenated; 0 = the protocol's (dino with cls: 4, at most the
    depth; else 1)."""
    batchnorm: bool = True
    """BatchNorm1d(affine=False, eps=1e-6) on the features before the heads (MAE)."""
    head_init_std: float = 0.01
    """Std of the heads' truncated-normal weight init (biases 0)."""
    num_classes: int = 0
    """Classes of the heads; 0 = those of the training split (`ssl-vit linprobe` counts them)."""
    lr_grid: tuple[float, ...] = (1.0,)
    """One head per value, all trained in one pass on the same features: head i's lr is value i x
    the scheduled lr (train.lr, or base_lr x batch / lr_batch_divisor)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas, used when train.optimizer is adamw."""

    def errors(self, cfg: Any) -> list[str]:
        """Every invalid value, each message naming its key; `cfg` is the whole run Config."""
        e = []
        if not self.checkpoint:
            e.append("method.checkpoint: required (--checkpoint RUN_DIR|FILE|NAME=PATH)")
        if self.num_classes <= 0:
            e.append(f"method.num_classes: must be positive, got {self.num_classes}")
        if self.n_last < 0:
            e.append(f"method.n_last: must be >= 0, got {self.n_last}")
        if self.head_init_std <= 0:
            e.append(f"method.head_init_std: must be positive, got {self.head_init_std}")
        if not self.lr_grid or min(self.lr_grid) <= 0:
            e.append(f"method.lr_grid: needs positive values, got {self.lr_grid}")
        if len(self.lr_grid) > 1 and cfg.train.clip_grad and cfg.train.clip_mode == "global":
            e.append(
                "train.clip_grad: a global norm couples the lr grid's heads; use clip_mode param"
            )
        if not all(0 <= b < 1 for b in self.betas):
            e.append(f"method.betas: each must be in [0, 1), got {self.betas}")
        return e


def probe_features(
    protocol: str, pool: str, n_last: int, width: int, depth: int
) -> tuple[Pool, int]:
    """(pool, n_last) the protocol reads from a backbone of this width and depth; explicit values
    are kept, 'auto' and 0 take the protocol's."""
    if pool == "auto":
        pool = "cls" if protocol == "mae" or width < VIT_B_WIDTH else "cls_avgpool"
    if not n_last:
        n_last = min(4, depth) if protocol == "dino" and pool == "cls" else 1
    return pool, n_last


class LinearProbe(nn.Module):
    """A frozen backbone, its features computed once per batch, an optional BatchNorm without
    affine parameters, and one linear head per value of the lr grid."""

    def __init__(self, backbone: Backbone, cfg: LinearProbeConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone.requires_grad_(False).eval()
        self.pool, self.n_last = probe_features(
            cfg.protocol, cfg.pool, cfg.n_last, backbone.embed_dim, backbone.depth
        )
        dim = feature_dim(backbone, self.pool, self.n_last)
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if cfg.batchnorm else nn.Identity()
        self.heads = nn.ModuleList(nn.Linear(dim, cfg.num_classes) for _ in cfg.lr_grid)
        for head in self.heads:
            trunc_normal_(head.weight, std=cfg.head_init_std)
            nn.init.zeros_(head.bias)

    def train(self, mode: bool = True) -> LinearProbe:
        """Set the heads' (and BatchNorm's) mode; the backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D) frozen features, float32."""
        return features(self.backbone, images, self.pool, self.n_last).float()

    def logits(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, heads, classes): every head on the same normalised features."""
        f = self.norm(self.features(images))
        return torch.stack([head(f) for head in self.heads], dim=1)

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Sum of the heads' cross-entropies (so each head gets exactly its own gradient);
        loss_h{i} per head when there are several."""
        logits = self.logits(batch["images"]).float()
        labels = batch["labels"][:, None].expand(-1, logits.shape[1])
        losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=0)
        out = {"loss": losses.sum()}
        if len(losses) > 1:
            out |= {f"loss_h{i}": loss.detach() for i, loss in enumerate(losses)}
        return out

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.training_step(batch)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, heads, classes) logits (classification_metrics scores each head)."""
        return self.logits(images)

    def param_groups(self) -> list[dict[str, Any]]:
        """Two groups per head, lr_scale = its grid value: the weight (weight decay; LARS trust
        ratio) and the bias (neither: MAE's lars.py adapts and decays only ndim > 1)."""
        groups = []
        for scale, head in zip(self.cfg.lr_grid, self.heads, strict=True):
            groups += [
                {"params": [head.weight], "lr_scale": scale, "wd_scale": 1.0, "always_adapt": True},
                {"params": [head.bias], "lr_scale": scale, "wd_scale": 0.0, "always_adapt": False},
            ]
        for g in groups:
            g["weight_decay"] = 0.0  # set every step by the trainer: train.weight_decay x wd_scale
        return groups


def linprobe_config(protocol: Literal["mae", "dino"] = "mae") -> Config:
    """The protocol's settings (REFERENCE.md) but the batch: train.effective_batch stays
    batch_size x processes, the lr following it (the recipes set the papers' 16384 and 1024)."""
    mae = protocol == "mae"
    return Config(
        data=DataConfig(crop_scale=(0.08, 1.0), interpolation="bicubic", hflip=0.5),
        train=TrainConfig(
            output_dir=f"runs/linprobe_{protocol}",
            epochs=90 if mae else 100,
            warmup_epochs=10 if mae else 0,
            optimizer="lars" if mae else "sgd",
            momentum=0.9,
            base_lr=0.1 if mae else 1e-3,
            lr_batch_divisor=256,
            min_lr=0.0,
            weight_decay=0.0,
            eval_every_epochs=1,
        ),
        method=LinearProbeConfig(protocol=protocol, batchnorm=mae, head_init_std=0.01),
    )


# ---------------------------------------------------------------------------------------------
# Running an evaluator from a checkpoint: `ssl-vit linprobe`, `ssl-vit finetune` and their recipes.


def pretrained_backbone(cfg: Config) -> Backbone:
    """The backbone an evaluator starts from (MethodSpec.backbone): method.checkpoint built for
    cfg.model — its image size (position embedding resampled, bicubic) and drop path."""
    return load_pretrained(cfg.method.checkpoint, model=cfg.model, which=cfg.method.which)


def from_checkpoint(cfg: Config, given: set[str]) -> Config:
    """Fill what the checkpoint and the data decide, unless the command line `given` it:
    model.name / img_size / patch_size from the checkpoint's backbone, method.num_classes from
    the training split, and a linear probe's 'auto' features."""
    head_only = ModelConfig(img_size=0, num_heads=cfg.model.num_heads)
    backbone = load_pretrained(cfg.method.checkpoint, model=head_only, which=cfg.method.which)
    size = backbone.grid_size[0] * backbone.patch_size
    arch = {"name": backbone.name, "img_size": size, "patch_size": backbone.patch_size}
    for key, value in arch.items():
        if f"model.{key}" not in given:
            setattr(cfg.model, key, value)
    if cfg.method.num_classes == 0:
        view = eval_view(cfg.data, cfg.model.img_size)
        data = build_dataset(cfg.data, view, seed=cfg.train.seed, image_size=cfg.model.img_size)
        if not data.classes:
            raise DataError(
                f"split {cfg.data.split!r} has no labels to count classes; set method.num_classes"
            )
        cfg.method.num_classes = len(data.classes)
    m = cfg.method
    if isinstance(m, LinearProbeConfig):
        m.pool, m.n_last = probe_features(
            m.protocol, m.pool, m.n_last, backbone.embed_dim, backbone.depth
        )
        if m.n_last > backbone.depth:
            raise ConfigError([f"method.n_last: {m.n_last} exceeds the depth {backbone.depth}"])
    return cfg


FROM_CHECKPOINT = """
model.name, model.img_size and model.patch_size default to the checkpoint's own (a different
img_size resamples the position embedding); method.num_classes 0 counts the training split's."""


def run_evaluator(cfg: Config, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of `ssl-vit linprobe|finetune` and of their recipes: `--checkpoint` (or
    method.checkpoint) and `--section.field` overrides on `cfg`, the rest from the checkpoint
    (`from_checkpoint`), then `fit`. Prints the final metrics as one JSON line (last and best
    evaluation; a linear probe adds each head's lr). Exit status 0, or 2 on a config, data or
    checkpoint error (printed to stderr)."""
    from accelerate import PartialState

    from ssl_vit.trainer import fit  # imports the method table, which imports this module

    argv = sys.argv[1:] if argv is None else argv
    try:
        checkpoint, rest = pop_flag(argv, "--checkpoint")
        overrides, want_help = parse_args(rest)
        if want_help:
            print(help_text(cfg, prog or sys.argv[0]) + "\n\n" + CHECKPOINT_HELP + FROM_CHECKPOINT)
            return 0
        apply_overrides(cfg, overrides)
        cfg.method.checkpoint = checkpoint or cfg.method.checkpoint
        if not cfg.method.checkpoint:
            raise ConfigError(["--checkpoint: required (a run directory, a file or NAME=PATH)"])
        result = fit(from_checkpoint(cfg, set(overrides)))
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(cfg.method, LinearProbeConfig):
        result["head_lr"] = [result["peak_lr"] * m for m in cfg.method.lr_grid]
    if PartialState().is_main_process:
        print(json.dumps(result), flush=True)
    return 0


PROG = "ssl-vit linprobe --checkpoint CHECKPOINT [--protocol mae|dino]"


def main(argv: list[str]) -> int:
    """`ssl-vit linprobe --checkpoint C [--protocol mae|dino] [--section.field value ...]`."""
    protocol, rest = pop_flag(argv, "--protocol", "mae")
    if protocol not in ("mae", "dino"):
        print(f"error: --protocol: expected mae or dino, got {protocol!r}", file=sys.stderr)
        return 2
    return run_evaluator(linprobe_config(protocol), rest, PROG)
