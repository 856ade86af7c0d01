"""DINO (Caron et al., 2104.14294): self-distillation of an EMA teacher into a student, multi-crop.

The student (backbone + head) sees 2 global and N local crops; the teacher, an EMA copy, sees only
the 2 globals. The loss is the cross-entropy between the teacher's centred, sharpened softmax and
the student's softmax over every pair of different views. Names follow the official checkpoints:
student `backbone.*`, `head.*` (`head.mlp.{0,2,4}`, `head.last_layer`); teacher
`teacher.backbone.*`, `teacher.head.*`; the center is `loss.center`.

The teacher lives in this module, so checkpoints hold it (with the center and temperature buffers)
and resume is exact; its parameters never require gradients: DDP and the optimizer skip them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ssl_vit.backbone import Backbone, cls_of_crops
from ssl_vit.config import field_errors
from ssl_vit.methods.init import init_student_teacher
from ssl_vit.methods.protocol import Method
from ssl_vit.ops import ema_init_share, ema_update_
from ssl_vit.optim import linspace_warmup_cosine, param_groups, warmup_cosine

log = logging.getLogger(__name__)

COLLAPSE_TOL = 0.01
"""on_log warns when the batch's mean teacher distribution puts more than 1 - COLLAPSE_TOL on one
dimension, or the teacher's entropy exceeds (1 - COLLAPSE_TOL) * log(out_dim) (uniform)."""


@dataclass
class DINOConfig:
    name: ClassVar[str] = "dino"
    out_dim: int = 65536
    """Output dimension of the DINO head (the number of 'prototypes')."""
    hidden_dim: int = 2048
    """Hidden width of the head's 3-layer MLP."""
    bottleneck_dim: int = 256
    """Width of the L2-normalised bottleneck before the weight-normalised last layer."""
    use_bn_in_head: bool = False
    """BatchNorm after the head's hidden layers (DINO's --use_bn_in_head; solo-learn's default):
    it spreads the outputs of near-identical inputs, against uniform collapse on small data."""
    norm_last_layer: bool = True
    """Fix the norm of the last layer's weights to 1 (stabler; the released ViT-S/16 frees it)."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at epoch 0."""
    teacher_temp: float = 0.04
    """Teacher temperature after the warmup (0.07 in the released models)."""
    warmup_teacher_temp_epochs: int = 0
    """Epochs of linear teacher-temperature warmup (30 in the released ViT-S/16)."""
    student_temp: float = 0.1
    """Student temperature."""
    center_momentum: float = 0.9
    """EMA momentum of the center (batch mean of the teacher outputs)."""
    momentum_teacher: float = 0.996
    """Teacher EMA momentum at step 0; it rises to 1 on a per-iteration cosine."""
    freeze_last_layer: int = 1
    """Epochs during which the head's last layer gets no update (its gradients are dropped)."""
    local_crops: int = 8
    """Local crops per image (10 in the released models); 2 global crops at model.img_size."""
    local_crop_size: int = 96
    """Side of the local crops in pixels; a multiple of the patch size."""
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    """RandomResizedCrop area range of the global crops ((0.25, 1) in the released models)."""
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    """RandomResizedCrop area range of the local crops ((0.05, 0.25) in the released models)."""
    blur: bool = True
    """Gaussian blur in the crops (p 1.0 / 0.1 / 0.5, sigma 0.1-2 px); off for small images,
    where 2 px blurs a 32 px image away (solo-learn's CIFAR crops have none)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas used to train this method."""

    def errors(self, cfg: Any) -> list[str]:
        """Every invalid value, each message naming its key; `cfg` is the whole run Config."""
        rules = {
            ">= 1": "out_dim hidden_dim bottleneck_dim",
            "positive": "warmup_teacher_temp teacher_temp student_temp",
            "in [0, 1]": "center_momentum momentum_teacher",
            ">= 0": "freeze_last_layer local_crops",
        }
        e = field_errors(self, "method", rules)
        if not 0 <= self.warmup_teacher_temp_epochs <= cfg.train.epochs:
            e.append(
                f"method.warmup_teacher_temp_epochs: must be in [0, train.epochs = "
                f"{cfg.train.epochs}], got {self.warmup_teacher_temp_epochs}"
            )
        patch = cfg.model.resolved_patch_size()
        if self.local_crop_size <= 0 or (patch and self.local_crop_size % patch):
            e.append(
                f"method.local_crop_size: must be a positive multiple of the patch size {patch}, "
                f"got {self.local_crop_size}"
            )
        for key in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                e.append(f"method.{key}: need 0 < min <= max <= 1, got {(lo, hi)}")
        return e + field_errors(self, "method", {"each in [0, 1)": "betas"})


class DINOHead(nn.Module):
    """(B, in_dim) -> (B, out_dim): MLP (GELU; BatchNorm with use_bn_in_head, synchronised
    across processes as DINO's) -> bottleneck -> L2-normalise -> weight-normed linear. The
    official layer order and names: torch's weight_norm loads `last_layer.weight_g/_v`."""

    def __init__(self, in_dim: int, cfg: DINOConfig):
        super().__init__()
        h, bn = cfg.hidden_dim, cfg.use_bn_in_head
        layers = []
        for a, b in ((in_dim, h), (h, h)):  # Linear, [BatchNorm], GELU
            layers += [nn.Linear(a, b), *([nn.SyncBatchNorm(b)] if bn else []), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(h, cfg.bottleneck_dim))
        for linear in (m for m in self.mlp if isinstance(m, nn.Linear)):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        self.last_layer = weight_norm(nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # the norm of each output's weights
        nn.init.ones_(g).requires_grad_(not cfg.norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def cross_view_ce(student: Tensor, q: Tensor, student_temp: float) -> Tensor:
    """Student logits (n_crops * B, K) and teacher probabilities q (2 * B, K), both crop-major ->
    the mean of CE(q_i, softmax(s_v / student_temp)) over the 2 (n_crops - 1) pairs of views
    v != i: DINO's loss, and DINOv2's on the cls tokens."""
    n_crops = student.shape[0] // (q.shape[0] // 2)
    log_s = F.log_softmax(student.float() / student_temp, dim=-1).chunk(n_crops)
    # sum over views v != i of CE(q_i, s_v) = -q_i . (sum_v log s_v - log s_i)
    log_s_sum = torch.stack(log_s).sum(0)
    loss = sum(-(q_i * (log_s_sum - log_s[i])).sum(-1).mean() for i, q_i in enumerate(q.chunk(2)))
    return loss / (2 * (n_crops - 1))


class DINOLoss(nn.Module):
    """Cross-entropy between teacher and student over all pairs of different views, with the
    center (a buffer, so checkpoints hold it) updated after each call."""

    def __init__(self, out_dim: int, student_temp: float, center_momentum: float):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: Tensor, teacher: Tensor, teacher_temp: Tensor) -> dict[str, Tensor]:
        """student (n_crops * B, K), teacher (2 * B, K), crop-major; teacher_temp a scalar tensor.

        Returns the loss and detached collapse monitors: the teacher's mean entropy, mean max
        probability and batch-mean max probability, the center's norm (before this update), and
        KL(teacher || student) averaged over the same pairs as the loss (= loss - entropy).
        """
        log_q = F.log_softmax((teacher.float() - self.center) / teacher_temp, dim=-1)
        q = log_q.exp()
        loss = cross_view_ce(student, q, self.student_temp)
        with torch.no_grad():
            entropy = -(q * log_q).sum(-1).mean()
            stats = {
                "teacher_entropy": entropy,
                "teacher_max_prob": q.max(-1).values.mean(),
                "teacher_batch_max_prob": q.mean(0).max(),
                "center_norm": self.center.norm(),
                "kl_teacher_student": loss.detach() - entropy,
            }
        self.update_center(teacher)
        return {"loss": loss, **stats}

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """center = m * center + (1 - m) * mean of the teacher outputs over all processes."""
        batch_sum = teacher.float().sum(0, keepdim=True)
        count = teacher.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(
            batch_sum / count, alpha=1 - self.center_momentum
        )


class DINO(nn.Module, Method):
    """Student `backbone` + `head`, EMA `teacher` (no drop path, no gradients), centred loss."""

    def __init__(self, backbone: Backbone, cfg: DINOConfig):
        super().__init__()
        if backbone.num_prefix_tokens < 1:
            raise ValueError("DINO reads the cls token: the backbone needs one (class_token=True)")
        self.cfg, self.backbone = cfg, backbone
        backbone.pos_interp = "offset"  # local crops: vision_transformer.interpolate_pos_encoding
        self.head = DINOHead(backbone.embed_dim, cfg)
        no_drop = {k: v for k, v in backbone.timm_kwargs.items() if k != "drop_path_rate"}
        self.teacher = nn.ModuleDict(
            {
                "backbone": Backbone(backbone.name, pos_interp="offset", **no_drop),
                "head": DINOHead(backbone.embed_dim, cfg),
            }
        )
        self.teacher.backbone.load_state_dict(backbone.state_dict())
        self.teacher.head.load_state_dict(self.head.state_dict())
        self.teacher.requires_grad_(False)
        self.loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        self.register_buffer("teacher_temp", torch.tensor(self.teacher_temp_at(0)))
        self.steps_per_epoch = self.total_steps = None

    def teacher_temp_at(self, epoch: int) -> float:
        """The official per-epoch schedule: linspace(warmup, final, warmup epochs), then final."""
        c, w = self.cfg, self.cfg.warmup_teacher_temp_epochs
        if epoch >= w:
            return c.teacher_temp
        frac = epoch / max(1, w - 1)
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * frac

    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """DINO's utils.get_params_groups: only biases and rank-1 parameters are exempt; the cls
        token and the position embedding decay."""
        return param_groups(self, weight_decay)

    def lr_at(self, step: int, total: int, warmup: float, peak: float, final: float) -> float:
        """DINO's utils.cosine_scheduler: np.linspace warmup, the peak at step warmup - 1."""
        return linspace_warmup_cosine(step, total, warmup, peak, final)

    def epoch_of(self, step: int) -> int:
        if self.steps_per_epoch is None:
            raise RuntimeError("DINO.set_schedule(total_steps, steps_per_epoch) was not called")
        return step // self.steps_per_epoch

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """batch["crops"]: 2 global (B, C, H, W) then N local (B, C, h, w) crops."""
        crops = batch["crops"]
        student = self.head(cls_of_crops(self.backbone, crops))
        with torch.no_grad():
            teacher = self.teacher.head(cls_of_crops(self.teacher.backbone, crops[:2]))
        out = self.loss(student, teacher, self.teacher_temp)
        return {**out, "teacher_temp": self.teacher_temp.clone()}  # a copy: the buffer moves on

    forward = training_step

    def init_from(self, checkpoint: str) -> list[str]:
        """Student and teacher from `checkpoint`; the center restarts from zero, as DINO's."""
        return init_student_teacher(self.backbone, self.head, self.teacher, checkpoint)

    def before_optimizer_step(self, step: int) -> None:
        """Drop the last layer's gradients during the first cfg.freeze_last_layer epochs."""
        if self.epoch_of(step) < self.cfg.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA of the student into the teacher (momentum cosine 0.996 -> 1 per iteration), then
        the teacher temperature of the next step."""
        m = warmup_cosine(step, total_steps, 0, self.cfg.momentum_teacher, 1.0)
        student = [*self.backbone.parameters(), *self.head.parameters()]
        ema_update_(list(self.teacher.parameters()), student, m)
        self.teacher_temp.fill_(self.teacher_temp_at(self.epoch_of(step + 1)))

    def on_log(self, metrics: dict[str, Any]) -> None:
        """Warn when the teacher collapses, naming the likely cause and its knobs: to one
        dimension, sharpening outweighs centering; to uniform, centering outweighs a teacher that
        hardly learns (an EMA slow for the run, ops.ema_init_share) or maps images to one output."""
        step, top, h = [metrics[k] for k in ("step", "teacher_batch_max_prob", "teacher_entropy")]
        c, total = self.cfg, self.total_steps or step
        if top > 1 - COLLAPSE_TOL:
            log.warning(
                f"step {step}: DINO teacher collapsed to one dimension ({top:.3f} of the batch "
                f"on one): sharpening outweighs centering; raise method.teacher_temp "
                f"({c.teacher_temp:g}) or warm it up (method.warmup_teacher_temp_epochs), or "
                f"lower method.center_momentum ({c.center_momentum:g})"
            )
        if h > (1 - COLLAPSE_TOL) * math.log(c.out_dim):
            share = ema_init_share(c.momentum_teacher, total)
            m_max = 1 - 2 * math.log(100) / (total + 1)  # the momentum whose share is 1 %
            ema = (
                f"its EMA time constant 1 / (1 - method.momentum_teacher) = "
                f"{1 / max(1e-12, 1 - c.momentum_teacher):.0f} steps against a run of {total} "
                f"steps leaves {100 * share:.0f}% of it at its random initialisation at the end"
            )
            cause = (
                f"the teacher hardly learns: {ema}; method.momentum_teacher <= {m_max:.4f} "
                f"leaves < 1% (or train longer)"
                if share >= 0.01
                else f"the teacher maps the images to nearly one output ({ema}): BatchNorm in "
                f"the head (method.use_bn_in_head {c.use_bn_in_head})"
            )
            log.warning(
                f"step {step}: DINO teacher collapsed to uniform (entropy {h:.3f} of "
                f"log(out_dim) {math.log(c.out_dim):.3f}). Likely cause: {cause}. Else: fewer "
                f"prototypes (method.out_dim {c.out_dim}), a lower method.teacher_temp "
                f"({c.teacher_temp:g})."
            )

    def export_backbone(self) -> Backbone:
        """The teacher's backbone: the one DINO evaluates and releases."""
        return self.teacher.backbone
