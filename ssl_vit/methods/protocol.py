"""The Method contract: what the training loop, the benchmark and the evaluators call on a method.

A method (MAE, DINO, DeiT) or evaluator (linear probe, fine-tune) is an `nn.Module` built as
`spec.build(backbone, method_cfg)` (ssl_vit.registry) that subclasses `Method`. Every hook is
documented here once; the bodies here are the defaults (no schedule, no hooks around the optimizer
step, the `.backbone` exported, no classifier), which a method overrides where it does more. The
loop calls every hook unconditionally: no `hasattr` probing.

Rules every method keeps: it never imports `accelerate` (the loop owns distribution); no `.cuda()`
(tensors follow the module's device); collective calls are guarded by
`torch.distributed.is_initialized()` so a loss also runs in one process without a group.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor

from ssl_vit.backbone import Backbone
from ssl_vit.methods.init import init_backbone
from ssl_vit.optim import param_groups, warmup_cosine


@runtime_checkable
class Method(Protocol):
    """The hooks of one trainable method, in the order the loop calls them."""

    classifies: ClassVar[bool] = False
    """True when `predict` gives class logits: the loop's evaluation is top-1/top-5 of `predict`;
    False: k-NN of `export_backbone()`."""

    segments: ClassVar[bool] = False
    """True when `predict` gives per-pixel logits (B, classes, H, W): the loop's evaluation is
    mIoU of `predict` over the evaluation split (eval.segmentation)."""

    def init_from(self, checkpoint: str) -> list[str]:
        """Continued pretraining (model.init): once, after construction and before the optimizer
        is built, load the networks `checkpoint` holds (any format --checkpoint takes; position
        embeddings brought to this grid by methods.init.init_backbone). Returns the parts taken,
        for the log. Default: the backbone."""
        init_backbone(self.backbone, checkpoint)  # type: ignore[attr-defined]
        return ["backbone"]

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups, built once before training. Each group may carry
        `lr_scale` (its lr = the scheduled lr x lr_scale: `group_lr`) and `wd_scale` (its weight
        decay = the scheduled weight decay x wd_scale; default: its `weight_decay` /
        train.weight_decay).
        Default: timm's add_weight_decay with no names to skip (optim.param_groups): biases and
        norms exempt, learned tokens and position embeddings decayed."""
        return param_groups(self, weight_decay)

    def lr_at(
        self, step: int, total_steps: int, warmup_steps: float, peak: float, final: float
    ) -> float:
        """The learning rate of optimizer step `step` (0-based) of `total_steps`, given the run's
        warmup length, peak and final lr. Default: MAE's lr_sched, linear warmup reaching the peak
        at step `warmup_steps`, then a half cosine to `final` (optim.warmup_cosine)."""
        return warmup_cosine(step, total_steps, warmup_steps, peak, final)

    def group_lr(
        self,
        group: dict[str, Any],
        lr: float,
        step: int,
        total_steps: int,
        peak: float,
        final: float,
    ) -> float:
        """The lr of param group `group` at optimizer step `step` of `total_steps`, given the
        step's scheduled `lr` (`lr_at`) and the run's `peak` and `final` lr. Default: lr x the
        group's `lr_scale` (1 without). A method whose groups follow schedules of different
        shapes overrides it (EoMT: the backbone warms up after the head)."""
        return lr * group.get("lr_scale", 1.0)

    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called once before the first step with the run's optimizer-step counts, for methods
        with epoch-based schedules of their own (DINO's teacher temperature, frozen last layer)."""

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """One micro-batch (ssl_vit.data's batch dict: "images" or "crops", "labels") -> a dict
        holding "loss" (scalar, differentiable) and any other scalars to log (detached). `forward`
        is this same function, so that DDP, FSDP and torch.compile wrap it."""
        ...

    def before_optimizer_step(self, step: int) -> None:
        """After backward and before clipping and the optimizer step `step` (0-based): e.g.
        DINO drops its last layer's gradients while it is frozen."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """After optimizer step `step` (0-based) of `total_steps`: EMA updates (DINO's teacher,
        DeiT's model EMA) and per-step schedules of the method's own."""

    def on_log(self, metrics: dict[str, Any]) -> None:
        """On the main process at each log step, with the logged metrics (step, loss, lr, the
        method's scalars): warnings about the run's health, e.g. DINO's collapse monitor."""

    def export_backbone(self) -> Backbone:
        """The backbone this method releases (backbone.safetensors, k-NN evaluation, TensorBoard
        attention maps). Default: `self.backbone`; DINO: the teacher's."""
        return self.backbone  # type: ignore[attr-defined]

    def predict(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, classes) logits, or (B, heads, classes) for a linear probe's lr
        grid, or (B, classes, H, W) for a segmenter; only for methods that classify or
        segment."""
        raise TypeError(f"{type(self).__name__} does not classify")

    def ema_view(self) -> Method | None:
        """The method's model EMA as a method of its own (DeiT, fine-tuning with model_ema):
        evaluated and exported beside the raw weights, suffix `_ema`; None when it keeps none."""
        return None

    def export_classifier(self) -> tuple[dict[str, Tensor], str, dict[str, Any]] | None:
        """(state dict, timm name, kwargs) that `timm.create_model(name, **kwargs)` loads with
        strict=True (classifier.safetensors + .json), or None where there is no timm classifier
        to export (a method that does not classify; a linear probe's grid of heads)."""
        return None
