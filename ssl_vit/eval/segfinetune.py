"""End-to-end semantic segmentation fine-tuning of a pretrained backbone: EoMT by default
(Kerssies et al., CVPR 2025, "Your ViT is Secretly an Image Segmentation Model"; facts from the
official tue-mps/eomt code), or the linear probe's head (segprobe.py) on a backbone that trains.

EoMT: `num_queries` learned queries join the tokens before the last `num_blocks` blocks. The final
norm of the tokens before each of those blocks, and after the last, gives a prediction: a class
head (linear, K + 1 logits, the last "no object") on the queries, and mask logits, the queries
through a 3-layer MLP dotted with the patch tokens upscaled by max(1, log2(p) - 2) transposed-conv
blocks (x2 each: 4x for 16 px patches). Each of those blocks runs masked attention: a query attends
only to the patches inside its mask of the prediction before the block (logits > 0 at the patch
grid), each query's mask kept with a probability annealed per block from 1 to 0 over training
(polynomial, power 0.9). The loss, at every prediction: Hungarian matching of queries to the
classes present (Mask2Former's costs on 12,544 uniform points: 2 class, 5 BCE, 5 dice), then class
cross-entropy (no-object weight 0.1), sigmoid BCE and dice on 12,544 points per matched mask (3x
oversampled, 75 % the most uncertain), weights 2 / 5 / 5. Semantic inference: per pixel, the sum
over queries of the softmax class probabilities (no object dropped) x the sigmoid masks.

Defaults: the official DINOv2 ADE20K semantic 512 config (EoMT-L, 58.4 mIoU): AdamW lr 1e-4,
weight decay 0.05 on every parameter, layer-wise lr decay 0.8 (block i x 0.8^(depth - 1 - i), the
embeddings as block 0, the final norm and heads x 1), a poly 0.9 schedule whose head warms up over
500 steps and whose backbone starts after them and warms up over 1,000; gradient norm clipped to
0.01; batch 16, 31 epochs, 512 px crops; mask annealing per block over steps 6,520-32,600.

    ssl-vit segfinetune --checkpoint runs/dinov2_vitl --data.path ADEChallengeData2016 [...]
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from scipy.optimize import linear_sum_assignment
from timm.layers import LayerNorm2d
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig, field_errors
from ssl_vit.eval.segmentation import Inference, upsample
from ssl_vit.eval.segprobe import (
    EVAL_AT_END,
    IGNORE_INDEX,
    linear_head,
    patch_features,
    pixel_loss,
)
from ssl_vit.methods.protocol import Method


@dataclass
class SegFineTuneConfig:
    name: ClassVar[str] = "segfinetune"
    checkpoint: str = ""
    """The pretrained backbone: a run directory or a timm pretrained directory, an official MAE /
    DINO / DINOv2 / DeiT .pth, a timm-named state dict or NAME=PATH (`--checkpoint` sets it)."""
    which: Literal["teacher", "student"] = "teacher"
    """Network of a DINO training checkpoint whose backbone is fine-tuned."""
    pos_interp: Literal["auto", "bicubic", "offset", "antialias"] = "auto"
    """Position-embedding resizing to each input's patch grid (backbone.resample_pos_embed);
    auto: an official DINOv2 file's own, else bicubic."""
    head: Literal["eomt", "linear"] = "eomt"
    """eomt: EoMT's queries, mask and class heads; linear: the linear probe's head (dropout,
    BatchNorm, 1x1 conv) on the last block's patch tokens, the backbone trained too."""
    num_classes: int = 0
    """Classes; 0 = those of the training split (a stated count must equal them)."""
    num_queries: int = 100
    """EoMT's learned queries (100 in the official ADE20K semantic configs)."""
    num_blocks: int = 4
    """The last blocks that carry the queries, each with masked attention."""
    masked_attn: bool = True
    """Masked attention and the intermediate predictions before each query block."""
    anneal_start: tuple[int, ...] = (6520, 13040, 19560, 26080)
    """Per query block (first to last): the step where its mask probability starts to fall."""
    anneal_end: tuple[int, ...] = (13040, 19560, 26080, 32600)
    """Per query block: the step from which its mask probability is 0."""
    num_points: int = 12544
    """Points per mask where the matching costs and the mask losses are computed."""
    oversample_ratio: float = 3.0
    """Candidate points per loss point, of which the most uncertain are kept."""
    importance_ratio: float = 0.75
    """Fraction of the loss points taken where |mask logit| is smallest; the rest uniform."""
    no_object_weight: float = 0.1
    """Class cross-entropy weight of "no object" (the unmatched queries)."""
    class_weight: float = 2.0
    """Weight of the class cross-entropy (and of the class cost in the matching)."""
    mask_weight: float = 5.0
    """Weight of the sigmoid BCE mask loss (and cost)."""
    dice_weight: float = 5.0
    """Weight of the dice loss (and cost)."""
    layer_decay: float = 0.8
    """Layer-wise lr decay: block i trains at lr x layer_decay^(depth - 1 - i), the embeddings
    as block 0, the final norm and the heads at lr; 1 = off."""
    poly_power: float = 0.9
    """Power of the poly lr schedule (and of the mask annealing)."""
    warmup_iters: tuple[int, int] = (500, 1000)
    """(head, backbone) linear warmups in steps: the head from step 0, the backbone (lr 0 until
    then) after the head's."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    dropout: float = 0.1
    """Linear head: dropout on the features before the BatchNorm."""
    batchnorm: bool = True
    """Linear head: BatchNorm2d (affine) on the features before the 1x1 conv."""
    head_init_std: float = 0.01
    """Linear head: std of the 1x1 conv's normal weight init (bias 0)."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Training images: short side resized to model.img_size x r, r ~ U(range), then cropped."""
    eval_mode: Literal["slide", "whole"] = "slide"
    """slide: model.img_size windows every method.stride pixels; whole: the image at once."""
    stride: int = 0
    """Sliding-window stride; 0 = two thirds of the crop (341 for 512)."""

    def errors(self, cfg: Any) -> list[str]:
        """Every invalid value, each message naming its key; `cfg` is the whole run Config."""
        e = []
        if not self.checkpoint:
            e.append("method.checkpoint: required (--checkpoint RUN_DIR|FILE|NAME=PATH)")
        e += field_errors(
            self,
            "method",
            {
                "positive": "num_queries num_points poly_power head_init_std",
                ">= 1": "num_blocks oversample_ratio",
                ">= 0": "num_classes stride class_weight mask_weight dice_weight",
                "in [0, 1]": "importance_ratio",
                "in [0, 1)": "dropout",
                "each in [0, 1)": "betas",
            },
        )
        if not 0 < self.no_object_weight <= 1:
            e.append(f"method.no_object_weight: must be in (0, 1], got {self.no_object_weight}")
        if not 0 < self.layer_decay <= 1:
            e.append(f"method.layer_decay: must be in (0, 1], got {self.layer_decay}")
        if min(self.warmup_iters) < 0:
            e.append(f"method.warmup_iters: need (head, backbone) >= 0, got {self.warmup_iters}")
        ends = (len(self.anneal_start), len(self.anneal_end))
        if self.head == "eomt" and self.masked_attn and ends != (self.num_blocks,) * 2:
            e.append(
                f"method.anneal_start / anneal_end: one step per query block "
                f"(method.num_blocks {self.num_blocks}), got {ends[0]} and {ends[1]}"
            )
        if any(s > t or s < 0 for s, t in zip(self.anneal_start, self.anneal_end, strict=False)):
            e.append("method.anneal_start: each must be >= 0 and <= its anneal_end")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            e.append(f"method.scale_range: need 0 < min <= max, got {self.scale_range}")
        if cfg.data.decode_on_device or cfg.data.streaming:
            e.append("data.decode_on_device / data.streaming: segfinetune reads map-style data")
        if self.num_classes > IGNORE_INDEX:
            e.append(f"method.num_classes: at most {IGNORE_INDEX} (8-bit masks, 255 ignored)")
        return e


# --- the schedules --------------------------------------------------------------------------


def poly(step: float, total: float, peak: float, final: float, power: float) -> float:
    """`final` + (peak - final) x (1 - step / total)^power, step clamped to [0, total]."""
    frac = min(max(step, 0.0), total) / max(total, 1.0)
    return final + (peak - final) * (1.0 - frac) ** power


def annealing(step: int, start: int, end: int, power: float) -> float:
    """The probability a query block applies its attention mask at `step`: 1 before `start`,
    (1 - (step - start) / (end - start))^power in between, 0 from `end` on (EoMT's schedule)."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return (1.0 - (step - start) / (end - start)) ** power


# --- Mask2Former's matching and losses, on points ------------------------------------------


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """maps (N, H, W), points (N, P, 2) as (x, y) in [0, 1] -> (N, P): the maps bilinearly
    sampled there (grid_sample, align_corners False, 0 outside): a loss over points needs no
    upsampling of the low-resolution mask logits to the labels' size."""
    grid = 2.0 * points[:, None] - 1.0
    return F.grid_sample(maps[:, None], grid, align_corners=False)[:, 0, 0]


def uncertain_points(logits: Tensor, num: int, oversample: float, importance: float) -> Tensor:
    """(N, H, W) mask logits -> (N, num, 2) points: of num x oversample uniform candidates the
    int(importance x num) whose logit is nearest 0, then uniform ones for the rest (PointRend's
    importance sampling, as Mask2Former's loss draws them)."""
    n, device = logits.shape[0], logits.device
    candidates = torch.rand(n, int(num * oversample), 2, device=device)
    uncertainty = -point_sample(logits, candidates).abs()
    k = int(importance * num)
    top = uncertainty.topk(k, dim=1).indices
    chosen = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
    return torch.cat([chosen, torch.rand(n, num - k, 2, device=device)], dim=1)


def pairwise_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """(Q, P) logits, (M, P) targets in [0, 1] -> (Q, M): each pair's sigmoid BCE averaged over
    the P points."""
    pos, neg = F.softplus(-logits), F.softplus(logits)  # -log sigmoid(x), -log(1 - sigmoid(x))
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """(Q, P) logits, (M, P) targets -> (Q, M): each pair's dice loss 1 - (2 p.t + 1) /
    (sum p + sum t + 1), p = sigmoid(logits)."""
    p = logits.sigmoid()
    return 1 - (2 * p @ targets.T + 1) / (p.sum(1)[:, None] + targets.sum(1)[None] + 1)


def point_losses(logits: Tensor, labels: Tensor, num_masks: Tensor) -> tuple[Tensor, Tensor]:
    """(N, P) mask logits and labels at P points -> (BCE, dice): per mask the sigmoid BCE
    averaged over its points and 1 - (2 p.t + 1) / (sum p + sum t + 1), each summed over the
    masks and divided by `num_masks`."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
    p = logits.sigmoid()
    dice = 1 - (2 * (p * labels).sum(1) + 1) / (p.sum(1) + labels.sum(1) + 1)
    return bce.sum() / num_masks, dice.sum() / num_masks


@dataclass
class MaskLoss:
    """Mask classification's criterion (Mask2Former's, as EoMT runs it) of one prediction."""

    num_classes: int
    num_points: int
    oversample_ratio: float
    importance_ratio: float
    no_object_weight: float
    class_weight: float
    mask_weight: float
    dice_weight: float

    @torch.no_grad()
    def match(
        self, mask_logits: Tensor, class_logits: Tensor, targets: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One image: (Q, h, w) mask logits, (Q, K + 1) class logits, (M, H, W) binary targets
        and their (M,) classes -> (queries, targets) matched, min(Q, M) pairs, by the Hungarian
        algorithm on the (Q, M) cost (returned third) class x -softmax probability + mask x BCE
        + dice x dice, the mask costs on num_points uniform points shared by every query and
        target (a host sync: scipy)."""
        points = torch.rand(1, self.num_points, 2, device=mask_logits.device)
        pred = point_sample(mask_logits, points.expand(len(mask_logits), -1, -1))
        true = point_sample(targets, points.expand(len(targets), -1, -1))
        cost = (
            self.class_weight * -class_logits.softmax(-1)[:, labels]
            + self.mask_weight * pairwise_bce(pred, true)
            + self.dice_weight * pairwise_dice(pred, true)
        )
        cost = cost.clamp(-1e10, 1e10).nan_to_num(0.0)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        return torch.as_tensor(rows), torch.as_tensor(cols), cost

    def mask_terms(self, logits: Tensor, targets: Tensor, num_masks: Tensor) -> tuple[Tensor, ...]:
        """Matched (N, h, w) mask logits and (N, H, W) targets -> `point_losses` on
        importance-sampled points."""
        with torch.no_grad():
            points = uncertain_points(
                logits, self.num_points, self.oversample_ratio, self.importance_ratio
            )
            labels = point_sample(targets, points)
        return point_losses(point_sample(logits, points), labels, num_masks)

    def __call__(
        self,
        mask_logits: Tensor,
        class_logits: Tensor,
        targets: list[tuple[Tensor, Tensor]],
    ) -> dict[str, Tensor]:
        """(B, Q, h, w), (B, Q, K + 1) and per image (binary masks (M, H, W), classes (M,)) ->
        {"ce", "mask", "dice"} unweighted: the cross-entropy over every query (unmatched ones
        "no object", weighted no_object_weight), the mask terms over the matched pairs divided
        by the batch's mean count of target masks per process."""
        mask_logits, class_logits = mask_logits.float(), class_logits.float()
        b, q = class_logits.shape[:2]
        classes = torch.full((b, q), self.num_classes, dtype=torch.long, device=class_logits.device)
        preds, trues = [], []
        for i, (masks, labels) in enumerate(targets):
            if len(labels) == 0:
                continue
            rows, cols, _ = self.match(mask_logits[i], class_logits[i], masks, labels)
            rows, cols = rows.to(labels.device), cols.to(labels.device)
            classes[i, rows] = labels[cols]
            preds.append(mask_logits[i, rows])
            trues.append(masks[cols])
        weight = torch.ones(self.num_classes + 1, device=class_logits.device)
        weight[-1] = self.no_object_weight
        ce = F.cross_entropy(class_logits.transpose(1, 2), classes, weight=weight)
        count = torch.tensor(float(sum(len(t) for t in trues)), device=class_logits.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        if not preds:  # no labelled pixel in the batch: mask terms 0, still in the graph
            zero = mask_logits.sum() * 0.0
            return {"ce": ce, "mask": zero, "dice": zero}
        bce, dice = self.mask_terms(torch.cat(preds), torch.cat(trues), count.clamp_min(1.0))
        return {"ce": ce, "mask": bce, "dice": dice}


def semantic_targets(masks: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(B, H, W) class maps (IGNORE_INDEX ignored) -> per image (binary masks (M, H, W) float,
    classes (M,)): one mask per class present. An ignored pixel is 0 in every mask: a negative
    for every query, as EoMT's ADE20K targets treat the unlabelled class (and its padding)."""
    out = []
    for m in masks:
        labels = m.unique()
        labels = labels[labels != IGNORE_INDEX]
        out.append(((m[None] == labels[:, None, None]).float(), labels))
    return out


def semantic_scores(mask_logits: Tensor, class_logits: Tensor, size: tuple[int, ...]) -> Tensor:
    """(B, Q, h, w) mask logits, (B, Q, K + 1) class logits -> (B, K, H, W) per-pixel scores:
    the mask logits upsampled bilinearly to `size`, sigmoid, weighted by each query's softmax
    class probabilities without "no object", summed over the queries."""
    masks = upsample(mask_logits.float(), size).sigmoid()
    probs = class_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqhw,bqk->bkhw", masks, probs)


# --- EoMT -----------------------------------------------------------------------------------


class Upscale(nn.Module):
    """x2 upscaling of a (B, D, h, w) map: transposed conv (2, stride 2), GELU, depthwise 3x3
    conv (no bias), LayerNorm2d (EoMT's ScaleBlock)."""

    def __init__(self, dim: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(self.act(self.up(x))))


class EoMT(nn.Module):
    """EoMT's parts beside the backbone: queries, class and mask heads, the upscaler, and the
    per-block mask probabilities (a buffer: saved, so a resume continues the annealing)."""

    def __init__(self, dim: int, patch: int, num_classes: int, num_queries: int, num_blocks: int):
        super().__init__()
        self.num_blocks = num_blocks
        self.queries = nn.Embedding(num_queries, dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_head = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)
        )
        ups = max(1, int(math.log2(patch)) - 2)
        self.upscale = nn.Sequential(*[Upscale(dim) for _ in range(ups)])
        self.register_buffer("mask_prob", torch.ones(num_blocks))

    def predict(self, x: Tensor, start: int, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Normed tokens (B, T, D), the queries at [start, start + Q), the patches after them ->
        (B, Q, h x 2^u, w x 2^u) mask logits, (B, Q, K + 1) class logits."""
        q = self.queries.num_embeddings
        queries = x[:, start : start + q]
        patches = rearrange(x[:, start + q :], "b (h w) d -> b d h w", h=grid[0], w=grid[1])
        masks = torch.einsum("bqd,bdhw->bqhw", self.mask_head(queries), self.upscale(patches))
        return masks, self.class_head(queries)

    def attention_mask(
        self, mask_logits: Tensor, prob: float, start: int, grid: tuple[int, int], n: int
    ) -> Tensor:
        """(B, Q, h', w') mask logits -> (B, 1, n, n) bool attention mask (True: may attend):
        the query rows see the patches where their logits, bilinearly resized to the patch
        grid, are > 0, and everything else; each query's row left unmasked with probability
        1 - prob. Every other row sees everything."""
        b, q = mask_logits.shape[:2]
        inside = F.interpolate(mask_logits.float(), grid, mode="bilinear") > 0
        inside = inside.flatten(2)
        if prob < 1:
            inside = inside | (torch.rand(b, q, 1, device=inside.device) > prob)
        mask = torch.ones(b, n, n, dtype=torch.bool, device=inside.device)
        mask[:, start : start + q, start + q :] = inside
        return mask[:, None]

    def forward(
        self, backbone: Backbone, images: Tensor, masked: bool = True
    ) -> list[tuple[Tensor, Tensor]]:
        """(B, C, H, W) -> [(mask logits, class logits)]: one prediction before each query
        block (when `masked`: they make its attention mask; only while training once its
        probability is 0) and the final one last."""
        seq = backbone.embed(images)
        x, start, first = seq.x, seq.num_prefix, backbone.depth - self.num_blocks
        probs = self.mask_prob.tolist() if masked else []  # one host read per forward
        preds = []
        for i in range(backbone.depth):
            if i == first:
                seq = backbone.add_prefix(seq, x, self.queries.weight.expand(len(x), -1, -1))
                x = seq.x
            attn_mask = None
            if masked and i >= first and (self.training or probs[i - first] > 0):
                preds.append(self.predict(backbone.norm(x), start, seq.grid))
                if probs[i - first] > 0:
                    p = probs[i - first]
                    attn_mask = self.attention_mask(preds[-1][0], p, start, seq.grid, x.shape[1])
            x = backbone.run_block(i, x, seq, attn_mask)
        return [*preds, self.predict(backbone.norm(x), start, seq.grid)]


# --- the evaluator --------------------------------------------------------------------------


class SegFineTune(nn.Module, Method):
    """The pretrained backbone and a segmentation head (EoMT or linear), trained together with
    layer-wise lr decay and a two-stage warmup (the head first)."""

    segments = True  # predict: (B, classes, H, W) scores, scored by mIoU

    def __init__(self, backbone: Backbone, cfg: SegFineTuneConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        d, k = backbone.embed_dim, cfg.num_classes
        if cfg.head == "eomt":
            if not 1 <= cfg.num_blocks <= backbone.depth:
                raise ValueError(
                    f"method.num_blocks: {cfg.num_blocks} not in [1, the depth {backbone.depth}]"
                )
            self.head = EoMT(d, backbone.patch_size, k, cfg.num_queries, cfg.num_blocks)
            self.criterion = MaskLoss(
                k,
                cfg.num_points,
                cfg.oversample_ratio,
                cfg.importance_ratio,
                cfg.no_object_weight,
                cfg.class_weight,
                cfg.mask_weight,
                cfg.dice_weight,
            )
        else:
            self.head = nn.Sequential(*linear_head(d, cfg))
        crop = backbone.grid_size[0] * backbone.patch_size
        self.inference = Inference(
            cfg.eval_mode, crop, cfg.stride or crop * 2 // 3, backbone.patch_size
        )

    def predictions(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """EoMT's [(mask logits, class logits)], intermediate first (`EoMT.forward`)."""
        return self.head(self.backbone, images, self.cfg.masked_attn)

    def logits(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, K, H, W): EoMT's semantic scores of its final prediction, or the
        linear head's logits upsampled bilinearly."""
        if self.cfg.head == "eomt":
            return semantic_scores(*self.predictions(images)[-1], images.shape[-2:])
        return upsample(self.linear_logits(images), images.shape[-2:])

    def linear_logits(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, K, H/p, W/p): the linear head on the last block's patch tokens."""
        return self.head(patch_features(self.backbone, images, 1, False))

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Linear: the per-pixel cross-entropy. EoMT: the weighted mask-classification loss
        summed over every prediction; the final one's terms logged."""
        images, masks = batch["images"], batch["masks"]
        if self.cfg.head == "linear":
            return {"loss": pixel_loss(self.linear_logits(images), masks)}
        targets, c, total = semantic_targets(masks), self.cfg, 0.0
        for mask_logits, class_logits in self.predictions(images):
            terms = self.criterion(mask_logits, class_logits, targets)
            weighted = (
                c.class_weight * terms["ce"]
                + c.mask_weight * terms["mask"]
                + c.dice_weight * terms["dice"]
            )
            total = total + weighted
        return {"loss": total} | {f"loss_{k}": v.detach() for k, v in terms.items()}

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.training_step(batch)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, K, H, W) scores: sliding window or whole image (method.eval_mode)."""
        return self.inference(self.logits, images)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """The next step's mask probability per query block (`annealing`)."""
        c = self.cfg
        if c.head == "eomt" and c.masked_attn:
            for j, (s, e) in enumerate(zip(c.anneal_start, c.anneal_end, strict=True)):
                self.head.mask_prob[j] = annealing(step + 1, s, e, c.poly_power)

    def lr_at(
        self, step: int, total_steps: int, warmup_steps: float, peak: float, final: float
    ) -> float:
        """The head's lr: linear warmup from 0 over method.warmup_iters[0] steps, then poly to
        `final` at `total_steps` (train.warmup_epochs is not used)."""
        w = self.cfg.warmup_iters[0]
        if step < w:
            return peak * step / w
        return poly(step - w, total_steps - w, peak, final, self.cfg.poly_power)

    def group_lr(
        self,
        group: dict[str, Any],
        lr: float,
        step: int,
        total_steps: int,
        peak: float,
        final: float,
    ) -> float:
        """A backbone group (`param_groups`): lr 0 for the head's warmup, then a linear warmup
        over method.warmup_iters[1] steps and poly to `final`; x its layer's lr_scale."""
        if not group.get("backbone"):
            return lr * group["lr_scale"]
        w0, w1 = self.cfg.warmup_iters
        if step < w0 + w1:
            base = peak * max(step - w0, 0) / max(w1, 1)
        else:
            base = poly(step - w0 - w1, total_steps - w0 - w1, peak, final, self.cfg.poly_power)
        return base * group["lr_scale"]

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """EoMT's layer ids for timm's param_groups_layer_decay: blocks.i i, the other backbone
        parameters (embeddings, tokens) 0, the final norm and the heads depth - 1 (with the
        last block: lr x 1)."""
        last = self.backbone.depth - 1

        def layer(name: str) -> int:
            if m := re.match(r"backbone\.blocks\.(\d+)\.", name):
                return int(m.group(1))
            if name.startswith("backbone.") and not name.startswith("backbone.norm."):
                return 0
            return last

        return layer

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """timm's layer-decay groups (`group_matcher`: lr_scale = layer_decay^(depth - 1 -
        layer)), every parameter decayed (EoMT's AdamW), each split into its backbone part
        ("backbone": True, the delayed warmup) and the rest."""
        groups = param_groups_layer_decay(
            self,
            weight_decay=1.0,  # the trainer applies train.weight_decay x wd_scale each step
            layer_decay=self.cfg.layer_decay,
            weight_decay_exclude_1d=False,
        )
        vit = {id(p) for p in self.backbone.parameters()}
        out = []
        for g in groups:
            for backbone in (True, False):
                params = [p for p in g["params"] if (id(p) in vit) == backbone]
                if params:
                    out.append(g | {"params": params, "backbone": backbone, "wd_scale": 1.0})
        return out


def segfinetune_config() -> Config:
    """EoMT's official DINOv2 ADE20K semantic 512 config: 512 px crops, batch 16, 31 epochs of
    AdamW at lr 1e-4, weight decay 0.05, gradient norm clipped to 0.01; one evaluation, at the
    end."""
    return Config(
        model=ModelConfig(img_size=512),
        data=DataConfig(interpolation="bilinear", hflip=0.5),
        train=TrainConfig(
            output_dir="runs/segfinetune",
            epochs=31,
            batch_size=16,
            effective_batch=16,
            optimizer="adamw",
            lr=1e-4,
            min_lr=0.0,
            weight_decay=0.05,
            warmup_epochs=0,
            clip_grad=0.01,
            eval_every_epochs=EVAL_AT_END,
            save_every_epochs=1,
        ),
        method=SegFineTuneConfig(),
    )
