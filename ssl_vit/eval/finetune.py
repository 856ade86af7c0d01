"""End-to-end fine-tuning of a pretrained backbone: MAE's protocol (its main_finetune.py).

Layer-wise lr decay from timm's `param_groups_layer_decay` (lr x decay^(depth + 1 - layer id): patch
embed, cls token and position embedding are layer 0, block i is i + 1, the final norm / fc_norm and
the head depth + 1), drop path (model.drop_path), and DeiT's supervised training with no teacher
(methods/deit.py: RandAugment, random erasing, Mixup / CutMix, label smoothing, optional model EMA)
of a classifier that averages the patch tokens through a fresh fc_norm, the final norm dropped
(timm's global_pool='avg'), or reads the cls token; head init std 2e-5. A distilled DeiT
checkpoint keeps its distillation token and gets both heads, the prediction their mean and the loss
the class head's alone (DeiT's main.py fine-tunes with distillation 'none'). An image size other
than the checkpoint's resamples the position embedding (bicubic without antialiasing: MAE's
interpolate_pos_embed, DeiT's main.py). The run exports classifier.safetensors + .json (last) and
classifier_best.* (best top-1), which `timm.create_model(name, **kwargs)` loads with strict=True.

    ssl-vit finetune --checkpoint runs/mae_vitb [--model.img_size 384 --section.field value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from timm.layers import trunc_normal_
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig
from ssl_vit.methods.deit import DeiT, DeiTConfig
from ssl_vit.methods.protocol import Method


def finetune_deit() -> DeiTConfig:
    """MAE fine-tuning's supervised settings: DeiT's with no teacher, no repeated augmentation,
    no colour jitter, no model EMA, and the classes counted from the data (num_classes 0)."""
    return DeiTConfig(
        num_classes=0, color_jitter=0.0, repeated_aug=1, model_ema=False, model_ema_decay=0.9999
    )


@dataclass
class FineTuneConfig:
    name: ClassVar[str] = "finetune"
    checkpoint: str = ""
    """The pretrained backbone: a run directory or a timm pretrained directory, an official MAE /
    DINO / DINOv2 / DeiT .pth, a timm-named state dict or NAME=PATH (`--checkpoint` sets it)."""
    which: Literal["teacher", "student"] = "teacher"
    """Network of a DINO training checkpoint whose backbone is fine-tuned."""
    pos_interp: Literal["auto", "bicubic", "offset", "antialias"] = "auto"
    """Position-embedding resizing when model.img_size is not the checkpoint's
    (backbone.resample_pos_embed); auto: an official DINOv2 file's own (weights.official_interp),
    else bicubic, MAE's and DeiT's."""
    global_pool: Literal["auto", "avg", "token"] = "auto"
    """avg: mean of the patch tokens through a fresh fc_norm, the final norm dropped (MAE); token:
    the cls token after the final norm, and a distilled backbone's distillation token to a second
    head, the prediction their mean (DeiT). auto: token for a distilled backbone, else avg."""
    layer_decay: float = 0.65
    """Layer-wise lr decay: layer l (0 = embeddings, depth + 1 = head) trains at lr x
    layer_decay^(depth + 1 - l); 1 = off."""
    head_init_std: float = 2e-5
    """Std of the head's truncated-normal weight init (bias 0)."""
    deit: DeiTConfig = field(default_factory=finetune_deit)
    """The supervised training (`--method.deit.FIELD`): classes (0 = those of the training
    split), RandAugment, random erasing, Mixup / CutMix, label smoothing, model EMA, betas."""

    @property
    def betas(self) -> tuple[float, float]:
        """AdamW betas (method.deit.betas)."""
        return self.deit.betas

    def errors(self, cfg: Any) -> list[str]:
        """Every invalid value, each message naming its key; `cfg` is the whole run Config."""
        e = []
        if not self.checkpoint:
            e.append("method.checkpoint: required (--checkpoint RUN_DIR|FILE|NAME=PATH)")
        if not 0 < self.layer_decay <= 1:
            e.append(f"method.layer_decay: must be in (0, 1], got {self.layer_decay}")
        if self.head_init_std <= 0:
            e.append(f"method.head_init_std: must be positive, got {self.head_init_std}")
        if self.deit.distillation != "none":
            e.append("method.deit.distillation: fine-tuning has no teacher; must be none")
        if self.deit.repeated_aug != 1:
            e.append("method.deit.repeated_aug: fine-tuning samples each image once; must be 1")
        return e + [m.replace("method.", "method.deit.", 1) for m in self.deit.errors(cfg)]


def avg_pool_backbone(backbone: Backbone) -> Backbone:
    """The backbone as timm builds it with global_pool='avg' (MAE's fine-tune): the final norm
    dropped and a fresh fc_norm (LayerNorm 1/0) to apply after the pool; every other weight
    copied. Its state dict is that of timm.create_model(name, num_classes=0, global_pool='avg').
    A model that keeps its final norm under avg pooling (timm's DINOv3 Eva: use_fc_norm False)
    keeps it, and has no fc_norm."""
    if backbone.timm_kwargs.get("global_pool") == "avg":
        return backbone
    pooled = Backbone(backbone.name, **{**backbone.timm_kwargs, "global_pool": "avg"})
    drop_norm = isinstance(pooled.norm, nn.Identity)
    state = {
        k: v for k, v in backbone.state_dict().items() if not (drop_norm and k.startswith("norm."))
    }
    fresh = {k: v for k, v in pooled.state_dict().items() if k.startswith("fc_norm.")}
    pooled.load_state_dict(state | fresh)
    return pooled.to(next(backbone.parameters()).device)


class Classifier(nn.Module):
    """Backbone + linear head on the pooled tokens, as timm's VisionTransformer.forward_head;
    a distilled backbone (timm's deit_*_distilled) + a second head on its distillation token, as
    DeiT fine-tunes distilled models. DeiT's student interface: forward(images) -> (logits,
    distillation-head logits or None); DeiT averages the two to predict."""

    def __init__(
        self, backbone: Backbone, num_classes: int, global_pool: str, head_init_std: float
    ):
        super().__init__()
        if global_pool == "token" and isinstance(backbone.norm, nn.Identity):
            raise ValueError("global_pool token: this backbone has no final norm (an avg export)")
        distilled = backbone.dist_token is not None
        if distilled and global_pool != "token":
            raise ValueError("a distilled backbone fine-tunes on its tokens: global_pool token")
        self.backbone, self.global_pool = backbone, global_pool
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        self.head_dist = nn.Linear(backbone.embed_dim, num_classes) if distilled else None
        for head in filter(None, (self.head, self.head_dist)):
            trunc_normal_(head.weight, std=head_init_std)
            nn.init.zeros_(head.bias)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, C, H, W) -> (B, classes) logits, and the distillation head's or None."""
        out = self.backbone(images)
        if self.global_pool == "avg":
            x = self.backbone.fc_norm(out.tokens[:, out.num_prefix :].mean(dim=1))
        else:
            x = out.tokens[:, 0]
        dist = None if self.head_dist is None else self.head_dist(out.tokens[:, 1])
        return self.head(x), dist

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer ids for timm's param_groups_layer_decay, numbered as MAE's lr_decay.py: the
        embeddings 0, blocks.i i + 1, everything unmatched (final norm / fc_norm, heads) last."""
        return {
            "stem": r"^backbone\.(?:cls_token|dist_token|reg_token|pos_embed|patch_embed|norm_pre)",
            "blocks": [(r"^backbone\.blocks\.(\d+)", None)],
        }


class FineTune(nn.Module, Method):
    """DeiT's supervised training (no teacher) of a `Classifier` on the pretrained backbone, with
    layer-wise lr decay."""

    classifies = True

    def __init__(self, backbone: Backbone, cfg: FineTuneConfig):
        super().__init__()
        self.cfg = cfg
        pool = cfg.global_pool
        if pool == "auto":
            pool = "avg" if backbone.dist_token is None else "token"
        if pool == "avg":
            backbone = avg_pool_backbone(backbone)
        num_classes = cfg.deit.num_classes
        classifier = Classifier(backbone, num_classes, pool, cfg.head_init_std)
        self.deit = DeiT(backbone, cfg.deit, student=classifier)

    @property
    def backbone(self) -> Backbone:
        return self.deit.backbone

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.deit.training_step(batch)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.deit.training_step(batch)

    def predict(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, classes) logits of the classifier being trained."""
        return self.deit.predict(images)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.deit.after_optimizer_step(step, total_steps)

    def export_classifier(self) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
        """(state dict, timm name, kwargs incl. global_pool and num_classes) for timm."""
        return self.deit.export_classifier()

    def ema_view(self) -> Method | None:
        return self.deit.ema_view()

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """timm's layer-decay groups over the classifier (not the EMA): lr_scale per layer, and
        no weight decay (wd_scale 0) for biases, norms, tokens and the position embedding."""
        groups = param_groups_layer_decay(
            self.deit.student,
            weight_decay=1.0,  # the trainer applies train.weight_decay x wd_scale each step
            no_weight_decay_list=[f"backbone.{n}" for n in self.backbone.no_weight_decay()],
            layer_decay=self.cfg.layer_decay,
        )
        for g in groups:
            g["wd_scale"] = g["weight_decay"]
        return groups


def finetune_config() -> Config:
    """MAE's fine-tune settings (REFERENCE.md) but the batch: train.effective_batch stays
    batch_size x processes, the lr following it (recipes/finetune_mae_vitb.py sets 1024)."""
    return Config(
        model=ModelConfig(drop_path=0.1),
        data=DataConfig(crop_scale=(0.08, 1.0), interpolation="bicubic", hflip=0.5),
        train=TrainConfig(
            output_dir="runs/finetune",
            epochs=100,
            warmup_epochs=5,
            optimizer="adamw",
            base_lr=5e-4,
            lr_batch_divisor=256,
            min_lr=1e-6,
            weight_decay=0.05,
            eval_every_epochs=1,
        ),
        method=FineTuneConfig(),
    )
