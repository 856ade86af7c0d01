"""Linear semantic segmentation probe of a frozen backbone: DINOv3's ADE20K linear protocol by
default, DINOv2's as an option.

DINOv3 (the defaults): the last block's patch tokens after the backbone's final norm, dropout 0.1,
BatchNorm, a 1x1 conv (weight N(0, 0.01), bias 0), logits bilinearly upsampled to the label size,
cross-entropy ignoring 255; AdamW lr 1e-3, betas (0.9, 0.999), weight decay 1e-3, 40,000
iterations at a total batch of 16, linear warmup over 1,500 iterations from x1e-6 then cosine to
0; training crops of 512 from images resized by a random ratio 0.5-2.0 of 512, flipped with
probability 0.5; sliding-window evaluation (crop 512, stride 341). DINOv2 (`--method.variant
dinov2`): the last 4 blocks' patch tokens, each concatenated with its block's cls token, and the
"+ms" multi-scale + flip test (`--method.multiscale true`).

    ssl-vit segprobe --checkpoint runs/mae_vitb --data.path ADEChallengeData2016 [...]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig, field_errors
from ssl_vit.eval.segmentation import Inference, upsample
from ssl_vit.methods.protocol import Method
from ssl_vit.optim import warmup_cosine

IGNORE_INDEX = 255
DINOV2_MS_RATIOS = (1.0, 1.32, 1.73, 2.28, 3.0)
"""The image-size ratios of DINOv2's multi-scale test (each also flipped)."""


@dataclass
class SegProbeConfig:
    name: ClassVar[str] = "segprobe"
    checkpoint: str = ""
    """The pretrained backbone: a run directory or a timm pretrained directory, an official MAE /
    DINO / DINOv2 / DeiT .pth, a timm-named state dict or NAME=PATH (`--checkpoint` sets it)."""
    which: Literal["teacher", "student"] = "teacher"
    """Network of a DINO training checkpoint whose backbone is probed."""
    pos_interp: Literal["auto", "bicubic", "offset", "antialias"] = "auto"
    """Position-embedding resizing to each input's patch grid (backbone.resample_pos_embed);
    auto: an official DINOv2 file's own, else bicubic."""
    variant: Literal["dinov3", "dinov2"] = "dinov3"
    """dinov3: the last block's patch tokens; dinov2: the last 4 blocks', each with its cls
    token broadcast and concatenated."""
    n_blocks: int = 0
    """Blocks whose patch tokens are concatenated; 0 = the variant's (1 or 4, at most the depth)."""
    cls_token: Literal["auto", "yes", "no"] = "auto"
    """Concatenate each block's cls token to its patch tokens; auto = the variant's."""
    dropout: float = 0.1
    """Dropout on the features before the BatchNorm."""
    batchnorm: bool = True
    """BatchNorm2d (affine) on the features before the 1x1 conv."""
    head_init_std: float = 0.01
    """Std of the 1x1 conv's normal weight init (bias 0)."""
    num_classes: int = 0
    """Classes; 0 = those of the training split (a stated count must equal them)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_iters: int = 1500
    """Linear warmup length in optimizer steps (train.warmup_epochs is not used)."""
    warmup_start: float = 1e-6
    """The warmup's first lr as a fraction of the peak."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Training images: short side resized to model.img_size x r, r ~ U(range), then cropped."""
    eval_mode: Literal["slide", "whole"] = "slide"
    """slide: model.img_size windows every method.stride pixels; whole: the image at once."""
    stride: int = 0
    """Sliding-window stride; 0 = two thirds of the crop (341 for 512)."""
    multiscale: bool = False
    """DINOv2's "+ms" test: method.ms_ratios of the image size, each also flipped, softmax
    averaged."""
    ms_ratios: tuple[float, ...] = DINOV2_MS_RATIOS
    """Image-size ratios of the multi-scale test."""

    def errors(self, cfg: Any) -> list[str]:
        """Every invalid value, each message naming its key; `cfg` is the whole run Config."""
        e = []
        if not self.checkpoint:
            e.append("method.checkpoint: required (--checkpoint RUN_DIR|FILE|NAME=PATH)")
        rules = {"positive": "head_init_std", ">= 0": "num_classes n_blocks stride warmup_iters"}
        e += field_errors(self, "method", rules)
        e += field_errors(self, "method", {"in [0, 1)": "dropout", "each in [0, 1)": "betas"})
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            e.append(f"method.scale_range: need 0 < min <= max, got {self.scale_range}")
        if not self.ms_ratios or min(self.ms_ratios) <= 0:
            e.append(f"method.ms_ratios: need positive values, got {self.ms_ratios}")
        if cfg.data.decode_on_device or cfg.data.streaming:
            e.append("data.decode_on_device / data.streaming: segprobe reads map-style data on CPU")
        if self.num_classes > IGNORE_INDEX:
            e.append(f"method.num_classes: at most {IGNORE_INDEX} (8-bit masks, 255 ignored)")
        return e


def head_features(variant: str, n_blocks: int, cls_token: str, depth: int) -> tuple[int, bool]:
    """(blocks, cls token concatenated) of a variant; explicit values kept."""
    n = n_blocks or min(4 if variant == "dinov2" else 1, depth)
    cls = variant == "dinov2" if cls_token == "auto" else cls_token == "yes"
    return n, cls


def token_map(tokens: Tensor, num_prefix: int, grid: tuple[int, int], cls: bool) -> Tensor:
    """(B, P + h*w, D) block output -> (B, D, h, w) patch-token map (row-major patches), with
    the cls token (position 0) broadcast over the grid and concatenated first when `cls`."""
    x = rearrange(tokens[:, num_prefix:], "b (h w) d -> b d h w", h=grid[0], w=grid[1])
    if cls:
        x = torch.cat([tokens[:, 0, :, None, None].expand(-1, -1, *grid), x], dim=1)
    return x


def patch_features(backbone: Backbone, images: Tensor, n_blocks: int, cls: bool) -> Tensor:
    """(B, C, H, W) -> (B, D', H/p, W/p): the last `n_blocks` blocks' patch-token maps (after the
    final norm; each with its cls token first when `cls`) concatenated along channels."""
    p = backbone.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    out = backbone(images, n_last=n_blocks)
    return torch.cat([token_map(t, out.num_prefix, grid, cls) for t in out.layers], dim=1)


def linear_head(dim: int, cfg: Any) -> tuple[nn.Module, nn.Module, nn.Conv2d]:
    """The linear protocol's head on a (B, dim, h, w) map, applied in this order: Dropout2d
    (cfg.dropout; Identity at 0), BatchNorm2d (cfg.batchnorm), 1x1 conv to cfg.num_classes
    (weight N(0, cfg.head_init_std), bias 0)."""
    dropout = nn.Dropout2d(cfg.dropout) if cfg.dropout else nn.Identity()
    norm = nn.BatchNorm2d(dim) if cfg.batchnorm else nn.Identity()
    conv = nn.Conv2d(dim, cfg.num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=cfg.head_init_std)
    nn.init.zeros_(conv.bias)
    return dropout, norm, conv


def pixel_loss(patch_logits: Tensor, masks: Tensor) -> Tensor:
    """Patch logits (B, K, h, w) upsampled bilinearly to masks (B, H, W) -> the per-pixel
    cross-entropy averaged over every pixel, those labelled 255 counting 0: the official
    DINOv3 loss (its CrossEntropyLoss with avg_non_ignore false, mmsegmentation's default)."""
    logits = upsample(patch_logits.float(), masks.shape[-2:])
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="none").mean()


class SegProbe(nn.Module, Method):
    """A frozen backbone and a linear per-patch head: dropout, BatchNorm, 1x1 conv."""

    segments = True  # predict: (B, classes, H, W) logits, scored by mIoU

    def __init__(self, backbone: Backbone, cfg: SegProbeConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone.requires_grad_(False).eval()
        self.n_blocks, self.cls = head_features(
            cfg.variant, cfg.n_blocks, cfg.cls_token, backbone.depth
        )
        if self.cls and backbone.num_prefix_tokens < 1:
            raise ValueError("method.cls_token: this backbone has no cls token")
        dim = self.n_blocks * backbone.embed_dim * (2 if self.cls else 1)
        self.dropout, self.norm, self.conv = linear_head(dim, cfg)
        crop = backbone.grid_size[0] * backbone.patch_size
        stride = cfg.stride or crop * 2 // 3
        ratios = cfg.ms_ratios if cfg.multiscale else ()
        self.inference = Inference(cfg.eval_mode, crop, stride, backbone.patch_size, ratios)

    def train(self, mode: bool = True) -> SegProbe:
        """Set the head's mode; the backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        pass

    def lr_at(
        self, step: int, total_steps: int, warmup_steps: float, peak: float, final: float
    ) -> float:
        """Linear warmup from peak x warmup_start over method.warmup_iters steps, then a half
        cosine to `final` at `total_steps` (mmengine's LinearLR + CosineAnnealingLR)."""
        w, s = self.cfg.warmup_iters, self.cfg.warmup_start
        if step < w:
            return peak * (s + (1 - s) * step / w)
        return warmup_cosine(step, total_steps, w, peak, final)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D', H/p, W/p) frozen patch features, float32."""
        return patch_features(self.backbone, images, self.n_blocks, self.cls).float()

    def patch_logits(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, K, H/p, W/p): the head on every patch."""
        return self.conv(self.norm(self.dropout(self.features(images))))

    def logits(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, K, H, W): patch logits upsampled bilinearly to the pixels."""
        return upsample(self.patch_logits(images), images.shape[-2:])

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-pixel cross-entropy over the pixels not labelled 255 (0 when all are)."""
        return {"loss": pixel_loss(self.patch_logits(batch["images"]), batch["masks"])}

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.training_step(batch)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, K, H, W) logits: sliding window or whole image (method.eval_mode),
        multi-scale + flip with method.multiscale."""
        return self.inference(self.logits, images)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """One group: the head's parameters, all decayed (mmsegmentation's default AdamW)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": 0.0, "wd_scale": 1.0}]


def segprobe_config(variant: Literal["dinov3", "dinov2"] = "dinov3") -> Config:
    """DINOv3's ADE20K linear protocol (or DINOv2's head): 512 px crops, batch 16, 40,000
    AdamW steps; one evaluation, at the end."""
    return Config(
        model=ModelConfig(img_size=512),
        data=DataConfig(interpolation="bilinear", hflip=0.5),
        train=TrainConfig(
            output_dir=f"runs/segprobe_{variant}",
            steps=40_000,
            batch_size=16,
            effective_batch=16,
            optimizer="adamw",
            lr=1e-3,
            min_lr=0.0,
            weight_decay=1e-3,
            warmup_epochs=0,
            eval_every_epochs=EVAL_AT_END,
            save_every_epochs=0,
            save_every_steps=4000,
        ),
        method=SegProbeConfig(variant=variant),
    )


EVAL_AT_END = 1_000_000
"""train.eval_every_epochs of the protocol: evaluated once, after the last step."""
