"""DeiT (Touvron et al., 2012.12877): a distillation token, with its own position embedding and
head, learns from a frozen teacher; inference averages the two heads. Without distillation there
is no teacher: supervised training of a ViT classifier (reused by fine-tuning)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from timm.data.mixup import Mixup, mixup_target
from timm.layers import trunc_normal_
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import Tensor, nn

import ssl_vit.weights as weights
from ssl_vit.backbone import Backbone
from ssl_vit.config import field_errors
from ssl_vit.methods.init import init_classifier
from ssl_vit.methods.protocol import Method
from ssl_vit.ops import soft_distillation_loss
from ssl_vit.optim import param_groups


@dataclass
class DeiTConfig:
    name: ClassVar[str] = "deit"
    distillation: Literal["none", "soft", "hard"] = "none"
    """none: supervised, one head; soft: KL to the teacher's softmax(x/tau); hard: CE to argmax."""
    alpha: float = 0.5
    """Weight of the distillation loss; the class-token loss gets 1 - alpha."""
    tau: float = 1.0
    """Soft-distillation temperature."""
    teacher: str = "regnety_160"
    """timm name of the teacher (RegNetY-16GF); unused for an ssl_vit export (its JSON names it)."""
    teacher_weights: str = ""
    """Teacher weights to distil from (weights.load_classifier): a .pth / .safetensors, a run."""
    teacher_img_size: int = 0
    """Teacher input side; the (mixed) images are resized to it, bicubic. 0 = the student's."""
    num_classes: int = 0
    """Number of classes of the heads (and of the teacher's output); 0 = the training split's.
    A stated count must equal the split's (a stream whose metadata names no classes needs it)."""
    mixup: float = 0.8
    """Mixup alpha, 0 = off (timm Mixup on the device; targets become soft)."""
    cutmix: float = 1.0
    """CutMix alpha, 0 = off."""
    mixup_switch_prob: float = 0.5
    """Probability of CutMix instead of Mixup for a batch when both are on."""
    label_smoothing: float = 0.1
    """Label smoothing of the (mixed) targets."""
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    """timm RandAugment policy of the training view ('' = off)."""
    color_jitter: float = 0.3
    """Colour jitter strength (timm applies it only when auto_augment is off, as in DeiT)."""
    reprob: float = 0.25
    """Random-erasing probability (per-pixel random values)."""
    repeated_aug: int = 3
    """Repeated augmentation: each sampled image appears this many times per epoch; 1 = off."""
    repeated_aug_trim: int = 0
    """Trim a repeated-augmentation epoch to a multiple of this (DeiT: 256); 0 = len(dataset)."""
    model_ema: bool = True
    """Keep an exponential moving average of the student (saved in checkpoints)."""
    model_ema_decay: float = 0.99996
    """EMA decay per optimizer step."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas used to train this method."""

    def errors(self, cfg: Any) -> list[str]:
        """Every invalid value, each message naming its key; `cfg` is the whole run Config."""
        rules = {
            "in [0, 1]": "alpha mixup_switch_prob reprob label_smoothing",
            "in [0, 1)": "model_ema_decay",
            "positive": "tau repeated_aug",
            ">= 0": "num_classes mixup cutmix color_jitter teacher_img_size repeated_aug_trim",
            "each in [0, 1)": "betas",
        }
        e = field_errors(self, "method", rules)
        w = self.teacher_weights
        if self.distillation != "none" and not (w and Path(w).exists()):
            e.append(f"method.teacher_weights: {w!r} is no file; distilling needs the teacher")
        if (self.mixup > 0 or self.cutmix > 0) and cfg.train.batch_size % 2:
            e.append(f"train.batch_size: Mixup needs an even batch, got {cfg.train.batch_size}")
        return e


class Student(nn.Module):
    """Backbone + class head on the cls token (+ one on the distillation token, when distilled)."""

    def __init__(self, backbone: Backbone, num_classes: int, distilled: bool):
        super().__init__()
        if distilled and backbone.dist_token is None:
            backbone = weights.distilled_backbone(backbone)
        self.backbone, dim = backbone, backbone.embed_dim
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = None if backbone.dist_token is None else nn.Linear(dim, num_classes)
        for head in filter(None, (self.head, self.head_dist)):  # timm's ViT head init
            trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, C, H, W) -> class-head logits (B, K), distillation-head logits (B, K) or None."""
        x = self.backbone(images).tokens
        return self.head(x[:, 0]), None if self.head_dist is None else self.head_dist(x[:, 1])


class DeiT(nn.Module, Method):
    """The student being trained, its frozen teacher (distilled) and its EMA (model_ema). A given
    `student` (fine-tuning's pooled classifier) has `.backbone`, `.head`, `.head_dist` (or None)
    and forward(images) -> (logits, dist or None)."""

    classifies = True

    def __init__(
        self,
        backbone: Backbone,
        cfg: DeiTConfig,
        teacher: nn.Module | None = None,
        student: nn.Module | None = None,
    ):
        super().__init__()
        self.cfg, distilled = cfg, cfg.distillation != "none"
        self.student = Student(backbone, cfg.num_classes, distilled) if student is None else student
        if distilled and teacher is None:
            teacher = weights.load_classifier(cfg.teacher_weights, cfg.teacher, cfg.num_classes)
        self.teacher = teacher.requires_grad_(False).eval() if distilled else None
        weights.exclude_from_state_dict(self, "teacher")  # rebuilt from its file, not saved
        self.ema = None
        if cfg.model_ema:
            self.ema = ModelEmaV3(self.student, decay=cfg.model_ema_decay).requires_grad_(False)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            kw = {"label_smoothing": cfg.label_smoothing, "num_classes": cfg.num_classes}
            self.mixup = Mixup(cfg.mixup, cfg.cutmix, switch_prob=cfg.mixup_switch_prob, **kw)
        self.criterion = SoftTargetCrossEntropy()

    @property
    def backbone(self) -> Backbone:
        return self.student.backbone

    def train(self, mode: bool = True) -> DeiT:
        """Set the student's mode; the teacher and the EMA always stay in eval mode."""
        super().train(mode)
        for frozen in filter(None, (self.teacher, self.ema)):
            frozen.eval()
        return self

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """batch["images"] (B, C, H, W), batch["labels"] (B,). Mixup/CutMix (numpy's global RNG)
        mixes the images in place; the teacher sees the mixed images, as in the official code."""
        images, labels, cfg = batch["images"], batch["labels"], self.cfg
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        else:
            targets = mixup_target(labels, cfg.num_classes, smoothing=cfg.label_smoothing)
        cls, dist = self.student(images)
        base = self.criterion(cls, targets)
        if self.teacher is None:  # DistillationLoss 'none': the class head alone, a token or not
            return {"loss": base}
        with torch.no_grad():  # under the trainer's autocast, at the teacher's own input size
            if (size := cfg.teacher_img_size) and size != images.shape[-1]:
                images = F.interpolate(images, (size, size), mode="bicubic", antialias=True)
            teacher = self.teacher(images).float()
        if cfg.distillation == "soft":
            kd = soft_distillation_loss(dist, teacher, cfg.tau)
        else:
            kd = F.cross_entropy(dist, teacher.argmax(dim=-1))
        loss = (1 - cfg.alpha) * base + cfg.alpha * kd
        return {"loss": loss, "cls_loss": base.detach(), "distill_loss": kd.detach()}

    forward = training_step

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, K) logits; distilled: the mean of the two heads (DeiT inference)."""
        cls, dist = self.student(images)
        return cls if dist is None else (cls + dist) / 2

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        if self.ema is not None:
            self.ema.update(self.student)

    def init_from(self, checkpoint: str) -> list[str]:
        """The student from `checkpoint` (`init_classifier`); the EMA restarts from it."""
        taken = init_classifier(self.student, checkpoint)
        if self.ema is not None:
            self.ema.set(self.student)
        return taken

    def ema_view(self) -> Method | None:
        """The model EMA as a DeiT of its own, evaluated and exported beside the raw weights."""
        if self.ema is None:
            return None
        view = copy.copy(self)  # shallow: shares everything but its table of sub-modules
        view._modules = self._modules | {"student": self.ema.module}
        return view

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """DeiT's (timm's create_optimizer): biases, norms, tokens, position embedding exempt."""
        skip = [f"student.backbone.{n}" for n in self.backbone.no_weight_decay()]
        return param_groups(self, weight_decay, skip)

    def export_classifier(self) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
        """(state dict, timm name, kwargs) that timm.create_model loads strictly (distilled too)."""
        s = self.student
        return weights.classifier_keys(s.backbone, s.head, self.cfg.num_classes, s.head_dist)
