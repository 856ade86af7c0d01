"""The explicit table of pretext methods and evaluators: name -> (config dataclass, model builder,
data view, ...); evaluators (linprobe, finetune) train through the same loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ssl_vit.data.device import DeviceView, device_single_view, device_supervised_view
from ssl_vit.data.samplers import RepeatedAugSampler
from ssl_vit.data.transforms import View, single_view, supervised_view
from ssl_vit.eval.finetune import FineTune, FineTuneConfig
from ssl_vit.eval.linear_probe import LinearProbe, LinearProbeConfig, pretrained_backbone
from ssl_vit.methods.deit import DeiT, DeiTConfig
from ssl_vit.methods.dino import DINO, DINOConfig, dino_device_view, dino_view
from ssl_vit.methods.mae import MAE, MAEConfig


class MethodSpec(NamedTuple):
    config: type
    """The method's config dataclass; its `name` class attribute is the table key."""
    build: Callable[..., Any]
    """build(backbone, method_cfg) -> nn.Module with training_step(batch) -> {"loss", ...}."""
    view: Callable[..., Callable[[Any], dict]]
    """view(cfg: Config) -> per-sample transform: image -> {"images": ...} or {"crops": [...]}."""
    device_view: Callable[..., DeviceView]
    """device_view(cfg: Config) -> `view` batched on the device, for data.decode_on_device."""
    sampler: Callable[..., Any] | None = None
    """sampler(cfg, dataset_len, num_processes) -> the global sample order of an epoch (with
    set_epoch), e.g. repeated augmentation; None = shuffling."""
    backbone: Callable[..., Any] | None = None
    """backbone(cfg: Config) -> the Backbone to build on, e.g. an evaluator's pretrained one;
    None = a fresh Backbone(cfg.model.name, **cfg.model.timm_kwargs())."""


def image_view(cfg: Any) -> View:
    """MAE's and the linear probe's view: crop, flip, normalise."""
    return single_view(cfg.data, cfg.model.img_size)


def image_device_view(cfg: Any) -> DeviceView:
    return device_single_view(cfg.data, cfg.model.img_size)


def supervised_run_view(cfg: Any) -> View:
    """DeiT's and fine-tuning's view: crop, flip, RandAugment, normalise, random erasing (Mixup /
    CutMix run on the batch)."""
    m = cfg.method
    return supervised_view(
        cfg.data,
        cfg.model.img_size,
        auto_augment=m.auto_augment,
        color_jitter=m.color_jitter,
        re_prob=m.reprob,
    )


def supervised_device_view(cfg: Any) -> DeviceView:
    m = cfg.method
    args = (m.auto_augment, m.color_jitter, m.reprob)
    return device_supervised_view(cfg.data, cfg.model.img_size, *args)


METHODS: dict[str, MethodSpec] = {
    "mae": MethodSpec(MAEConfig, MAE, image_view, image_device_view),
    "dino": MethodSpec(DINOConfig, DINO, dino_view, dino_device_view),
    "deit": MethodSpec(
        DeiTConfig,
        DeiT,
        supervised_run_view,
        supervised_device_view,
        lambda cfg, n, processes: RepeatedAugSampler(
            n, processes, cfg.train.batch_size, cfg.method.repeated_aug, cfg.train.seed
        ),
    ),
    "linprobe": MethodSpec(
        LinearProbeConfig,
        LinearProbe,
        image_view,
        image_device_view,
        backbone=pretrained_backbone,
    ),
    "finetune": MethodSpec(
        FineTuneConfig,
        FineTune,
        supervised_run_view,
        supervised_device_view,
        backbone=pretrained_backbone,
    ),
}
