"""DINOv2 (Oquab et al., 2304.07193): DINO's self-distillation on the cls tokens, iBOT's masked
patch prediction on the global crops, and the KoLeo spreading term, with an EMA teacher.

The student sees 2 global crops, block-masked (a learned mask token replaces some patches), and N
local crops; the teacher, an EMA copy, sees the 2 globals unmasked. Losses (the official
ssl_meta_arch): DINO's cross-view cross-entropy on the heads' cls outputs; iBOT's cross-entropy
between student and teacher head outputs on the masked patches, each image's patches weighted by
1 / its number of masked patches; KoLeo on each global crop's student cls features. The teacher
targets are Sinkhorn-Knopp normalised (or DINO-centred). Names follow the official student and
teacher dicts: `backbone.*`, `dino_head.*`, `ibot_head.*` (separate head only), `mask_token`;
`teacher.{backbone,dino_head,ibot_head}.*`; the centers are `dino_center.center`,
`ibot_center.center`.

Masks are drawn here, in the training process, from torch's global CPU generator (the official
collate draws them in the loader workers with Python's `random`): the generator's state is part of
every checkpoint, so a resumed run draws the same masks; the CPU keeps the device free of the
block sampler's small sequential loop, and the masked positions travel with the batch to the device
(non-blocking), so no step waits on the host. The masked patches' rows are padded to the
official collate's `upperbound` (a function of the batch, grid and mask config, not of the draw),
weight 0 in the iBOT loss and left out of Sinkhorn-Knopp and the center: every step has the same
shapes, so torch.compile builds one graph (the draw, first in the step, its only graph break).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.config import field_errors
from ssl_vit.methods.dino import DINOConfig, DINOHead, DINOLoss, cross_view_ce
from ssl_vit.methods.init import init_backbone
from ssl_vit.methods.protocol import Method
from ssl_vit.ops import ema_update_
from ssl_vit.optim import linspace_warmup_cosine, warmup_cosine


@dataclass
class DINOv2Config:
    name: ClassVar[str] = "dinov2"
    out_dim: int = 65536
    """Prototypes of the DINO head (dino.head_n_prototypes)."""
    hidden_dim: int = 2048
    """Hidden width of the DINO head's 3-layer MLP."""
    bottleneck_dim: int = 256
    """Width of the DINO head's L2-normalised bottleneck."""
    ibot_separate_head: bool = False
    """A head of its own for the patch tokens (ibot.separate_head; true in the ViT-L/g runs);
    false: the DINO head serves both."""
    ibot_out_dim: int = 65536
    """Prototypes of the separate iBOT head."""
    ibot_hidden_dim: int = 2048
    """Hidden width of the separate iBOT head."""
    ibot_bottleneck_dim: int = 256
    """Bottleneck width of the separate iBOT head."""
    dino_loss_weight: float = 1.0
    """Weight of the cls-token (DINO) loss."""
    ibot_loss_weight: float = 1.0
    """Weight of the masked-patch (iBOT) loss."""
    koleo_loss_weight: float = 0.1
    """Weight of KoLeo on the student's cls features, summed over the 2 global crops."""
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    """Range of the share of patches masked in a masked global crop (stratified over the batch)."""
    mask_sample_probability: float = 0.5
    """Share of the global crops that are masked (int(2B x p) of them, chosen at random)."""
    centering: Literal["sinkhorn_knopp", "centering"] = "sinkhorn_knopp"
    """Teacher targets: Sinkhorn-Knopp (3 iterations; the ViT-L/g runs) or DINO's EMA center."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at step 0."""
    teacher_temp: float = 0.07
    """Teacher temperature after the warmup."""
    warmup_teacher_temp_epochs: int = 30
    """Epochs of linear teacher-temperature warmup (per iteration, np.linspace)."""
    student_temp: float = 0.1
    """Student temperature (both losses)."""
    center_momentum: float = 0.9
    """EMA momentum of the centers (centering "centering" only)."""
    momentum_teacher: float = 0.992
    """Teacher EMA momentum at step 0; it rises to 1 on a per-iteration cosine."""
    freeze_last_layer: int = 1
    """Epochs during which the heads' last layers get no update."""
    layerwise_decay: float = 0.9
    """Layer-wise lr decay: block i (0-based) of depth d gets lr x decay^(d - i); the patch
    embedding, tokens and position embedding decay^(d + 1); heads and final norm 1."""
    patch_embed_lr_mult: float = 0.2
    """Further lr factor of the patch embedding."""
    local_crops: int = 8
    """Local crops per image; 2 global crops at model.img_size."""
    local_crop_size: int = 96
    """Side of the local crops in pixels; a multiple of the patch size (98 for patch 14)."""
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    """RandomResizedCrop area range of the global crops."""
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    """RandomResizedCrop area range of the local crops."""
    blur: bool = True
    """Gaussian blur in the crops (p 1.0 / 0.1 / 0.5, as DINO's)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas used to train this method."""

    def errors(self, cfg: Any) -> list[str]:
        """Every invalid value, each message naming its key; `cfg` is the whole run Config. The
        fields it shares with DINO are checked by DINO's rules."""
        e = DINOConfig.errors(self, cfg)  # type: ignore[arg-type]  # the shared fields, by name
        rules = {
            ">= 1": "ibot_out_dim ibot_hidden_dim ibot_bottleneck_dim",
            ">= 0": "dino_loss_weight ibot_loss_weight koleo_loss_weight patch_embed_lr_mult",
            "in [0, 1]": "mask_sample_probability",
        }
        e += field_errors(self, "method", rules)
        if not 0 < self.layerwise_decay <= 1:
            e.append(f"method.layerwise_decay: must be in (0, 1], got {self.layerwise_decay}")
        lo, hi = self.mask_ratio_min_max
        if not 0 <= lo <= hi <= 1:
            e.append(f"method.mask_ratio_min_max: need 0 <= min <= max <= 1, got {(lo, hi)}")
        return e

    def masked_rows(self, n_images: int, n_patches: int) -> int:
        """The iBOT rows a step of n_images global crops of n_patches runs (mask_upperbound):
        for flops.dinov2_flops, which cannot import a method."""
        ratio, p = self.mask_ratio_min_max, self.mask_sample_probability
        return mask_upperbound(n_images, n_patches, ratio, p)

    def head(self, which: Literal["dino", "ibot"]) -> DINOConfig:
        """The DINOConfig of a head; its last layer's norm trains (DINOv2's head fixes none)."""
        sizes = (self.out_dim, self.hidden_dim, self.bottleneck_dim)
        if which == "ibot":
            sizes = (self.ibot_out_dim, self.ibot_hidden_dim, self.ibot_bottleneck_dim)
        return DINOConfig(*sizes, norm_last_layer=False)


# ---------------------------------------------------------------------------------------------
# Block masks (dinov2/data/masking.py MaskingGenerator, dinov2/data/collate.py)


def _add_block(mask: np.ndarray, max_patches: float, min_patches: int = 4) -> int:
    """Mask one random block of area in [min_patches, max_patches] and aspect in [0.3, 1/0.3]
    that adds 1 to max_patches new patches; up to 10 tries. Returns the patches added."""
    h, w = mask.shape
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(10):
        area_u, aspect_u, top_u, left_u = torch.rand(4, dtype=torch.float64).tolist()
        area = min_patches + (max_patches - min_patches) * area_u
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * aspect_u)
        bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if bw < w and bh < h:
            top, left = int(top_u * (h - bh + 1)), int(left_u * (w - bw + 1))
            block = mask[top : top + bh, left : left + bw]
            added = bh * bw - int(block.sum())
            if 0 < added <= max_patches:
                block[...] = True
                return added
    return 0


def block_mask(h: int, w: int, n_masked: int) -> np.ndarray:
    """(h, w) bool with at most n_masked patches masked, in blocks of at most half the grid: the
    official MaskingGenerator(input_size=(h, w), max_num_patches=0.5 h w)(n_masked)."""
    mask = np.zeros((h, w), dtype=bool)
    count = 0
    while count < n_masked:
        added = _add_block(mask, min(n_masked - count, 0.5 * h * w))
        if added == 0:
            break
        count += added
    return mask


def mask_bins(n_images: int, ratio: tuple[float, float], probability: float) -> list[float]:
    """The edges of the int(n_images x probability) equal bins of `ratio` (the official collate's
    torch.linspace, float32)."""
    return torch.linspace(*ratio, int(n_images * probability) + 1).tolist()


def mask_upperbound(
    n_images: int, n_patches: int, ratio: tuple[float, float], probability: float
) -> int:
    """The most patches batch_masks can mask in n_images crops of n_patches: the sum over its bins
    of int(n_patches x the bin's upper edge) (the official collate's `upperbound`). A function of
    the shapes and config only: the iBOT rows padded to it have one shape every step."""
    return sum(int(n_patches * e) for e in mask_bins(n_images, ratio, probability)[1:])


@torch.compiler.disable
def batch_masks(
    n_images: int, grid: tuple[int, int], ratio: tuple[float, float], probability: float
) -> Tensor:
    """(n_images, h * w) bool: int(n_images x probability) images masked, the i-th of them with
    a share drawn in the i-th of as many equal bins of `ratio`, the rest unmasked, in a random
    order (the official collate_data_and_cast). From torch's global CPU generator."""
    h, w = grid
    edges = mask_bins(n_images, ratio, probability)
    n = len(edges) - 1
    u = torch.rand(n, dtype=torch.float64).tolist()
    counts = [int(h * w * (edges[i] + (edges[i + 1] - edges[i]) * u[i])) for i in range(n)]
    masks = [block_mask(h, w, c) for c in counts + [0] * (n_images - n)]
    order = torch.randperm(n_images).tolist()
    return torch.from_numpy(np.stack([masks[i] for i in order]).reshape(n_images, h * w))


@torch.compiler.disable
def ibot_masks(
    n_images: int, grid: tuple[int, int], ratio: tuple[float, float], probability: float
) -> tuple[Tensor, Tensor, Tensor]:
    """On the host, before the compiled graph: masks (B, N) bool from batch_masks, the flat
    indices (U,) of their masked patches (row-major) and each one's iBOT weight (U,), 1 / its
    image's masked count (the official mask_indices_list and masks_weight), both padded to
    U = mask_upperbound with index 0 and weight 0, as ssl_meta_arch pads its head inputs to
    `upperbound`: static shapes, so one graph serves every draw."""
    masks = batch_masks(n_images, grid, ratio, probability)
    upperbound = mask_upperbound(n_images, masks.shape[1], ratio, probability)
    index = masks.flatten().nonzero().squeeze(1)
    if len(index) > upperbound:
        raise ValueError(f"{len(index)} masked patches exceed the upper bound {upperbound}")
    weight = (1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    pad = (0, upperbound - len(index))
    return masks, F.pad(index, pad), F.pad(weight, pad)


# ---------------------------------------------------------------------------------------------
# Losses


def ibot_patch_loss(
    student: Tensor, q: Tensor, weight: Tensor, n_images: int, student_temp: float
) -> Tensor:
    """Student logits (U, K), teacher probabilities q (U, K) and weights (U,) of the masked
    patches (ibot_masks: 1 / the image's masked count, 0 on the padding) -> sum of weight x
    CE(q, softmax(s / T)) / B, B the images (iBOTPatchLoss.forward_masked): each image weighs
    the same however many patches it masks; unmasked images count in B."""
    ce = -(q * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1)
    return (ce * weight).sum() / n_images


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """(B, D) -> -mean log ||x_i - x_nn(i)|| of the L2-normalised rows, each to its nearest other
    row (Sablayrolles et al.'s KoLeo; DINOv2's KoLeoLoss): spreads the features. float32."""
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), eps=eps, dim=-1)
        with torch.no_grad():
            nearest = (x @ x.t()).fill_diagonal_(-1).argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


def all_sum(t: Tensor) -> Tensor:
    """`t` summed over the processes (in place), or `t` without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sinkhorn_knopp(
    teacher: Tensor, temp: Tensor, valid: Tensor | None = None, n_iterations: int = 3
) -> Tensor:
    """Teacher logits (B, K) -> (B, K) targets, each row a distribution, the prototypes used
    about equally across the global batch: exp(t / temp) alternately normalised over prototypes
    (to 1/K each) and samples (to 1/B each), B counting every process's rows (the official
    sinkhorn_knopp_teacher of DINOLoss and iBOTPatchLoss). `valid` (B,) bool: the rows that count
    (iBOT's padding False); the others stay out of every sum and of B (the official
    n_masked_patches_tensor) and come back 0."""
    valid = torch.ones_like(teacher[:, 0], dtype=torch.bool) if valid is None else valid
    q = torch.where(valid[:, None], torch.exp(teacher.float() / temp), 0).t()  # (K, B)
    k = q.shape[0]
    b = all_sum(valid.sum().float())
    q /= all_sum(q.sum())
    for _ in range(n_iterations):
        q /= all_sum(q.sum(dim=1, keepdim=True)) * k
        q /= torch.where(valid, q.sum(dim=0, keepdim=True), 1) * b  # padded columns stay 0
    return torch.where(valid[:, None], (q * b).t(), 0)  # no masked row anywhere: 0, not NaN


# ---------------------------------------------------------------------------------------------
# The method


class DINOv2(nn.Module, Method):
    """Student `backbone` + `dino_head` (+ `ibot_head`) + `mask_token`; EMA `teacher` (no drop
    path, no gradients)."""

    def __init__(self, backbone: Backbone, cfg: DINOv2Config):
        super().__init__()
        if backbone.num_prefix_tokens < 1:
            raise ValueError(
                "DINOv2 reads the cls token: the backbone needs one (class_token=True)"
            )
        self.cfg, self.backbone = cfg, backbone
        backbone.pos_interp = "offset"  # interpolate_offset 0.1, no antialiasing
        d = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        heads = {"dino_head": cfg.head("dino")} | (
            {"ibot_head": cfg.head("ibot")} if cfg.ibot_separate_head else {}
        )
        for name, head_cfg in heads.items():
            setattr(self, name, DINOHead(d, head_cfg))
        no_drop = {k: v for k, v in backbone.timm_kwargs.items() if k != "drop_path_rate"}
        teacher = {"backbone": Backbone(backbone.name, pos_interp="offset", **no_drop)}
        self.teacher = nn.ModuleDict(teacher | {n: DINOHead(d, c) for n, c in heads.items()})
        for name, module in self.teacher.items():
            module.load_state_dict(getattr(self, name).state_dict())
        self.teacher.requires_grad_(False)
        # DINO's loss modules hold the centers (centering "centering"; their forward is unused)
        self.dino_center = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        ibot_dim = cfg.ibot_out_dim if cfg.ibot_separate_head else cfg.out_dim
        self.ibot_center = DINOLoss(ibot_dim, cfg.student_temp, cfg.center_momentum)
        start = cfg.warmup_teacher_temp if cfg.warmup_teacher_temp_epochs else cfg.teacher_temp
        self.register_buffer("teacher_temp", torch.tensor(start))
        self.steps_per_epoch = self.total_steps = None

    def init_from(self, checkpoint: str) -> list[str]:
        """Continued pretraining: the checkpoint's backbone for the student and the teacher alike
        (before, the teacher kept its fresh weights); heads and centers start afresh."""
        init_backbone(self.backbone, checkpoint)
        self.teacher.backbone.load_state_dict(self.backbone.state_dict())
        return ["backbone", "teacher backbone"]

    def students(self) -> list[nn.Module]:
        """The student networks in the teacher's order: backbone, DINO head, [iBOT head]."""
        return [getattr(self, name) for name in self.teacher]

    def patch_head(self, net: nn.Module) -> DINOHead:
        """The head of the patch tokens of `net` (the student: self; or the teacher)."""
        return net.ibot_head if self.cfg.ibot_separate_head else net.dino_head

    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps

    def epoch_of(self, step: int) -> int:
        if self.steps_per_epoch is None:
            raise RuntimeError("DINOv2.set_schedule(total_steps, steps_per_epoch) was not called")
        return step // self.steps_per_epoch

    def teacher_temp_at(self, step: int) -> float:
        """The official per-iteration schedule: np.linspace(warmup, final, W) over the first
        W = warmup epochs x steps per epoch steps, then final."""
        c = self.cfg
        w = c.warmup_teacher_temp_epochs * self.steps_per_epoch
        if self.epoch_of(step) >= c.warmup_teacher_temp_epochs:
            return c.teacher_temp
        frac = step / max(1, w - 1)
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * frac

    def lr_at(self, step: int, total: int, warmup: float, peak: float, final: float) -> float:
        """The official CosineScheduler: np.linspace warmup from 0, then the half cosine."""
        return linspace_warmup_cosine(step, total, warmup, peak, final)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """get_params_groups_with_decay + fuse_params_groups: lr_scale = layerwise_decay^(d + 1 -
        layer), layer 0 the patch embedding, tokens and position embedding (and mask token),
        i + 1 block i, d + 1 the final norm and the heads; x patch_embed_lr_mult for the patch
        embedding. No weight decay for biases and rank-1 parameters (norms, layer scale)."""
        c, d = self.cfg, self.backbone.depth
        stem = ("backbone.patch_embed.", "backbone.pos_embed", "backbone.cls_token")
        stem += ("backbone.reg_token", "mask_token")
        groups: dict[tuple[float, float], dict[str, Any]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            layer = d + 1
            if name.startswith(stem):
                layer = 0
            elif name.startswith("backbone.blocks."):
                layer = int(name.split(".")[2]) + 1
            lr_scale = c.layerwise_decay ** (d + 1 - layer)
            if name.startswith("backbone.patch_embed."):
                lr_scale *= c.patch_embed_lr_mult
            wd_scale = 0.0 if p.ndim <= 1 or name.endswith(".bias") else 1.0
            group = groups.setdefault(
                (lr_scale, wd_scale),
                {"params": [], "lr_scale": lr_scale, "wd_scale": wd_scale},
            )
            group["weight_decay"] = weight_decay * wd_scale
            group["params"].append(p)
        return list(groups.values())

    def teacher_targets(
        self, logits: Tensor, center: DINOLoss, valid: Tensor | None = None
    ) -> Tensor:
        """Teacher head outputs (M, K) -> target probabilities: Sinkhorn-Knopp, or DINO's
        centred, sharpened softmax (the center then updated with these outputs). `valid` (M,)
        bool: the iBOT rows that are not padding; the center moves by their mean in this
        process, averaged over the processes (the official iBOTPatchLoss.update_center)."""
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, self.teacher_temp, valid)
        q = F.softmax((logits.float() - center.center) / self.teacher_temp, dim=-1)
        if valid is None:
            center.update_center(logits)
        else:
            rows = torch.where(valid[:, None], logits.float(), 0).sum(0, keepdim=True)
            center.update_center(rows / valid.sum().clamp(min=1))
        return q

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """batch["crops"]: 2 global (B, C, H, W), then N local (B, C, h, w) crops, then `twins`
        more."""
        c, crops = self.cfg, batch["crops"]
        n, grid = (
            2 * len(crops[0]),
            self.backbone.patch_embed.dynamic_feat_size(crops[0].shape[-2:]),
        )
        # first, before any tensor op: the host draw is the compiled step's only graph break
        masks, index, weight = ibot_masks(n, grid, c.mask_ratio_min_max, c.mask_sample_probability)
        globals_ = torch.cat(crops[:2])
        masks, index, weight = (
            t.to(globals_.device, non_blocking=True) for t in (masks, index, weight)
        )
        valid = weight > 0

        def masked(out: Any) -> Tensor:  # (U, D): the masked patches' tokens, row-major, padded
            return out.tokens[:, out.num_prefix :].flatten(0, 1).index_select(0, index)

        with torch.no_grad():
            out = self.teacher.backbone(globals_)
            t_cls = self.teacher.dino_head(out.tokens[:, 0])
            t_patch = self.patch_head(self.teacher)(masked(out))
            q_cls = self.teacher_targets(t_cls, self.dino_center)
            q_patch = self.teacher_targets(t_patch, self.ibot_center, valid)

        out = self.backbone(globals_, mask=masks, mask_token=self.mask_token)
        cls = out.tokens[:, 0]
        locals_ = crops[2 : len(crops) - self.twins]
        local = [self.backbone(torch.cat(locals_)).tokens[:, 0]] if locals_ else []
        s_cls = self.dino_head(torch.cat([cls, *local]))
        s_patch = self.patch_head(self)(masked(out))
        # teacher crop i against every student crop but i: the official crop-swapped global pairs
        # and every local crop against both globals, over 2 + 2 N terms
        dino = cross_view_ce(s_cls, q_cls, c.student_temp)
        ibot = ibot_patch_loss(s_patch, q_patch, weight, n, c.student_temp)
        koleo = sum(koleo_loss(x) for x in cls.chunk(2))
        loss = c.dino_loss_weight * dino + c.ibot_loss_weight * ibot + c.koleo_loss_weight * koleo
        extra = self.extra_losses(crops, out)  # a subclass's terms (DINOv3's Gram loss)
        for weight_, value in extra.values():
            loss = loss + weight_ * value
        with torch.no_grad():
            entropy = -(q_cls * q_cls.clamp_min(1e-30).log()).sum(-1).mean()
            stats = {"dino_loss": dino, "ibot_loss": ibot, "koleo_loss": koleo}
            stats |= {name: value for name, (_, value) in extra.items()}
            stats = {k: v.detach() for k, v in stats.items()} | {
                "teacher_entropy": entropy,
                "teacher_batch_max_prob": q_cls.mean(0).max(),
                "masked_share": masks.float().mean(),
                "teacher_temp": self.teacher_temp.clone(),  # a copy: the buffer moves on
            }
        return {"loss": loss, **stats}

    forward = training_step

    twins = 0
    """Crops at the end of batch["crops"] that are no student's (a subclass's own views)."""

    def extra_losses(
        self, crops: list[Tensor], out: Any
    ) -> dict[str, tuple[Tensor | float, Tensor]]:
        """Further loss terms, name -> (weight, value), added to the loss as weight x value and
        logged by name: none here. `crops` the batch's, `out` the student's (masked) backbone
        output on the 2 global crops."""
        return {}

    def before_optimizer_step(self, step: int) -> None:
        """Drop the heads' last-layer gradients during the first cfg.freeze_last_layer epochs."""
        if self.epoch_of(step) < self.cfg.freeze_last_layer:
            for head in self.students()[1:]:
                for p in head.last_layer.parameters():
                    p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA of the student into the teacher (momentum cosine 0.992 -> 1 per iteration), then
        the teacher temperature of the next step."""
        m = warmup_cosine(step, total_steps, 0, self.cfg.momentum_teacher, 1.0)
        student = [p for net in self.students() for p in net.parameters()]
        ema_update_(list(self.teacher.parameters()), student, m)
        self.teacher_temp.fill_(self.teacher_temp_at(step + 1))

    def export_backbone(self) -> Backbone:
        """The teacher's backbone: the one DINOv2 evaluates and releases."""
        return self.teacher.backbone
