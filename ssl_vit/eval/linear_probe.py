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

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config, DataConfig, TrainConfig, field_errors
from ssl_vit.eval.features import Pool, feature_dim, features
from ssl_vit.methods.protocol import Method
from ssl_vit.optim import warmup_cosine

VIT_B_WIDTH = 768
"""DINO's linear eval reads the last 4 cls tokens below this width (ViT-S), cls + avgpool from
it (ViT-B)."""


@dataclass
class LinearProbeConfig:
    name: ClassVar[str] = "linprobe"
    checkpoint: str = ""
    """The pretrained backbone: a run directory or a timm pretrained directory, an official MAE /
    DINO / DINOv2 / DeiT .pth, a timm-named state dict or NAME=PATH (`--checkpoint` sets it)."""
    which: Literal["teacher", "student"] = "teacher"
    """Network of a DINO training checkpoint whose backbone is probed."""
    pos_interp: Literal["auto", "bicubic", "offset", "antialias"] = "auto"
    """Position-embedding resizing when model.img_size is not the checkpoint's
    (backbone.resample_pos_embed); auto: an official DINOv2 file's own (weights.official_interp),
    else the protocol's (mae: bicubic, dino: offset)."""
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
    """Classes of the heads; 0 = those of the training split (a stated count must equal them)."""
    lr_grid: tuple[float, ...] = (1.0,)
    """One head per value, all trained in one pass on the same features: head i's lr is value i x
    the scheduled lr (train.lr, or base_lr x batch / lr_batch_divisor)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas, used when train.optimizer is adamw."""
    lr_steps: Literal["iteration", "epoch"] = "iteration"
    """How often the lr schedule moves: every iteration (MAE's lr_sched) or once per epoch, a
    staircase (DINO's eval_linear.py steps CosineAnnealingLR per epoch; the dino protocol's)."""

    def errors(self, cfg: Any) -> list[str]:
        """Every invalid value, each message naming its key; `cfg` is the whole run Config."""
        e = []
        if not self.checkpoint:
            e.append("method.checkpoint: required (--checkpoint RUN_DIR|FILE|NAME=PATH)")
        e += field_errors(
            self, "method", {"positive": "head_init_std", ">= 0": "num_classes n_last"}
        )
        if not self.lr_grid or min(self.lr_grid) <= 0:
            e.append(f"method.lr_grid: needs positive values, got {self.lr_grid}")
        if len(self.lr_grid) > 1 and cfg.train.clip_grad and cfg.train.clip_mode == "global":
            e.append(
                "train.clip_grad: a global norm couples the lr grid's heads; use clip_mode param"
            )
        return e + field_errors(self, "method", {"each in [0, 1)": "betas"})


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


class LinearProbe(nn.Module, Method):
    """A frozen backbone, its features computed once per batch, an optional BatchNorm without
    affine parameters, and one linear head per value of the lr grid."""

    classifies = True  # predict: (B, heads, classes), each head scored

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

    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch

    def lr_at(
        self, step: int, total_steps: int, warmup_steps: float, peak: float, final: float
    ) -> float:
        """The run's warmup + cosine, read at the epoch's first step when lr_steps is epoch."""
        if self.cfg.lr_steps == "epoch":
            step -= step % self.steps_per_epoch
        return warmup_cosine(step, total_steps, warmup_steps, peak, final)

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

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two groups per head, lr_scale = its grid value: the weight (weight decay; LARS trust
        ratio) and the bias (neither: MAE's lars.py adapts and decays only ndim > 1)."""
        groups = []
        for scale, head in zip(self.cfg.lr_grid, self.heads, strict=True):
            groups += [
                {"params": [head.weight], "lr_scale": scale, "wd_scale": 1.0},
                {"params": [head.bias], "lr_scale": scale, "wd_scale": 0.0},
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
        method=LinearProbeConfig(
            protocol=protocol,
            batchnorm=mae,
            head_init_std=0.01,
            lr_steps="iteration" if mae else "epoch",
        ),
    )
