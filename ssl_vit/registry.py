"""The explicit tables of what trains through the loop: pretext METHODS and EVALUATORS.

Each entry says how to build the module (a `methods.protocol.Method`) from a backbone and its
config, which per-image view feeds it (and its batched device counterpart), the sample order, and
where its backbone comes from. Config parsing takes these tables as arguments (`method_configs`)
rather than importing them, so config.py stays on the ground floor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config, ConfigError
from ssl_vit.data import DataError, build_dataset
from ssl_vit.data.device import (
    DeviceView,
    device_single_view,
    device_supervised_view,
    device_view,
)
from ssl_vit.data.samplers import MixedSizes, RepeatedAugSampler
from ssl_vit.data.segmentation import build_segmentation, seg_train_view
from ssl_vit.data.streaming import stream_classes
from ssl_vit.data.transforms import (
    Crop,
    View,
    ViewChoice,
    multi_crop,
    single_view,
    supervised_view,
)
from ssl_vit.eval.accuracy import EvalData, eval_data
from ssl_vit.eval.finetune import FineTune, FineTuneConfig
from ssl_vit.eval.linear_probe import LinearProbe, LinearProbeConfig
from ssl_vit.eval.pretrained import pretrained_backbone
from ssl_vit.eval.segfinetune import SegFineTune, SegFineTuneConfig
from ssl_vit.eval.segmentation_eval import segmentation_data
from ssl_vit.eval.segprobe import SegProbe, SegProbeConfig
from ssl_vit.methods.deit import DeiT, DeiTConfig
from ssl_vit.methods.dino import DINO, DINOConfig
from ssl_vit.methods.dinov2 import DINOv2, DINOv2Config
from ssl_vit.methods.dinov3 import DINOv3, DINOv3Config
from ssl_vit.methods.mae import MAE, MAEConfig
from ssl_vit.methods.protocol import Method
from ssl_vit.weights import load_pretrained

log = logging.getLogger("ssl_vit")


def fresh_backbone(cfg: Config) -> Backbone:
    """A pretext method's starting point: a new timm ViT of cfg.model."""
    return Backbone(cfg.model.name, **cfg.model.timm_kwargs())


class MethodSpec(NamedTuple):
    config: type
    """The method's config dataclass; its `name` class attribute is the table key."""
    build: Callable[..., Any]
    """build(backbone, method_cfg) -> a `Method` (methods/protocol.py)."""
    view: Callable[[Config], Callable[[Any], dict]]
    """view(cfg) -> per-image transform: image -> {"images": ...} or {"crops": [...]}."""
    device_view: Callable[[Config], DeviceView]
    """device_view(cfg) -> `view` batched on the device, for data.decode_on_device."""
    sampler: Callable[[Config, int, int], Any] | None = None
    """sampler(cfg, dataset_len, num_processes) -> the global sample order of an epoch (with
    set_epoch), e.g. repeated augmentation; None = shuffling."""
    backbone: Callable[[Config], Backbone] = fresh_backbone
    """backbone(cfg) -> the Backbone to build on: fresh for pretext methods, the checkpoint's for
    evaluators."""
    dataset: Callable[..., Any] = build_dataset
    """dataset(data_cfg, view, split=None, *, seed, image_size) -> the training data
    (data.build_dataset; a segmenter's image + mask pairs: data.segmentation)."""


def image_view(cfg: Config) -> View:
    """MAE's and the linear probe's view: crop, flip, normalise."""
    return single_view(cfg.data, cfg.model.img_size)


def image_device_view(cfg: Config) -> DeviceView:
    return device_single_view(cfg.data, cfg.model.img_size)


def segmentation_view(cfg: Config) -> Any:
    """The segmentation evaluators' view: image and mask resized, cropped and flipped
    together."""
    return seg_train_view(cfg.data, cfg.model.img_size, cfg.method.scale_range)


def no_device_view(cfg: Config) -> DeviceView:
    raise ConfigError([f"data.decode_on_device: {cfg.method.name} has no device view"])


def dino_crops(cfg: Config, choice: int = 0) -> tuple[Crop, ...]:
    """DINO's (and DINOv2's) multi-crop of a run Config: 2 globals at model.img_size, then the
    method's locals; each with colour jitter (p 0.8), grayscale (p 0.2) and Gaussian blur (p 1.0 /
    0.1 on the globals, 0.5 on the locals; none without method.blur); solarisation (p 0.2) on the
    second global only. DINOv3 with method.gram.teacher_size: each global with its twin of that
    size, undistorted, for the Gram teacher (after all the crops); with method.mixed_sizes the
    sizes of their `choice`."""
    m = cfg.method
    size, scale, blur = cfg.model.img_size, m.global_crop_scale, float(m.blur)
    local_size, twin = m.local_crop_size, 0
    if isinstance(m, DINOv3Config):
        twin = m.gram.teacher_size
        if m.mixed_sizes:
            size, local_size = m.mixed_sizes[choice], m.mixed_local_sizes[choice]
            twin = m.mixed_teacher_sizes[choice] if m.mixed_teacher_sizes else twin
    local = Crop(local_size, m.local_crop_scale, 0.8, 0.2, blur=0.5 * blur)
    return (
        Crop(size, scale, jitter=0.8, grayscale=0.2, blur=blur, twin=twin),
        Crop(size, scale, jitter=0.8, grayscale=0.2, blur=0.1 * blur, solarize=0.2, twin=twin),
        *[local] * m.local_crops,
    )


def dino_view(cfg: Config) -> View | ViewChoice:
    """DINO's multi-crop (loader workers, PIL): image -> {"crops": [2 + N tensors]}; DINOv3's
    high-resolution adaptation: one such view per choice of sizes (mixed_sampler picks)."""
    if isinstance(cfg.method, DINOv3Config) and cfg.method.mixed_sizes:
        n = len(cfg.method.mixed_sizes)
        return ViewChoice(tuple(multi_crop(cfg.data, dino_crops(cfg, k)) for k in range(n)))
    return multi_crop(cfg.data, dino_crops(cfg))


def dino_device_view(cfg: Config) -> DeviceView:
    """The same multi-crop, batched on the device (`data.decode_on_device`)."""
    return device_view(cfg.data, "crops", dino_crops(cfg))


def mixed_sampler(cfg: Config, n: int, processes: int) -> MixedSizes | None:
    """DINOv3's high-resolution adaptation: a shuffled order carrying each step's choice of crop
    sizes (method.mixed_ratios); else None (plain shuffling)."""
    m, t = cfg.method, cfg.train
    if not m.mixed_sizes:
        return None
    return MixedSizes(n, processes, t.batch_size, m.mixed_ratios, t.seed)


def supervised(deit: Callable[[Config], DeiTConfig]) -> tuple[Callable, Callable, Callable]:
    """(view, device view, repeated-augmentation sampler) of supervised training, reading the
    DeiT settings `deit(cfg)` gives: DeiT's own config, or fine-tuning's nested one. The view:
    crop, flip, RandAugment, normalise, random erasing (Mixup / CutMix run on the batch)."""

    def view(cfg: Config) -> View:
        m = deit(cfg)
        return supervised_view(
            cfg.data,
            cfg.model.img_size,
            auto_augment=m.auto_augment,
            color_jitter=m.color_jitter,
            re_prob=m.reprob,
        )

    def device(cfg: Config) -> DeviceView:
        m = deit(cfg)
        args = (m.auto_augment, m.color_jitter, m.reprob)
        return device_supervised_view(cfg.data, cfg.model.img_size, *args)

    def sampler(cfg: Config, n: int, processes: int) -> RepeatedAugSampler:
        t = cfg.train
        m = deit(cfg)
        return RepeatedAugSampler(
            n, processes, t.batch_size, m.repeated_aug, t.seed, trim=m.repeated_aug_trim
        )

    return view, device, sampler


METHODS: dict[str, MethodSpec] = {
    "mae": MethodSpec(MAEConfig, MAE, image_view, image_device_view),
    "dino": MethodSpec(DINOConfig, DINO, dino_view, dino_device_view),
    "dinov2": MethodSpec(DINOv2Config, DINOv2, dino_view, dino_device_view),  # draws its masks
    "dinov3": MethodSpec(  # + Gram anchoring, the high-resolution adaptation
        DINOv3Config, DINOv3, dino_view, dino_device_view, mixed_sampler
    ),
    "deit": MethodSpec(DeiTConfig, DeiT, *supervised(lambda cfg: cfg.method)),
}
"""The pretext methods: `ssl-vit train --method NAME` and the pretraining recipes."""

EVALUATORS: dict[str, MethodSpec] = {
    "linprobe": MethodSpec(
        LinearProbeConfig, LinearProbe, image_view, image_device_view, None, pretrained_backbone
    ),
    "finetune": MethodSpec(
        FineTuneConfig,
        FineTune,
        *supervised(lambda cfg: cfg.method.deit)[:2],  # shuffled: no repeated augmentation
        backbone=pretrained_backbone,
    ),
    "segprobe": MethodSpec(
        SegProbeConfig,
        SegProbe,
        segmentation_view,
        no_device_view,
        backbone=pretrained_backbone,
        dataset=build_segmentation,
    ),
    "segfinetune": MethodSpec(
        SegFineTuneConfig,
        SegFineTune,
        segmentation_view,
        no_device_view,
        backbone=pretrained_backbone,
        dataset=build_segmentation,
    ),
}
"""The evaluators that train through the same loop from a checkpoint's backbone: `ssl-vit
linprobe`, `ssl-vit finetune`, `ssl-vit segprobe`, `ssl-vit segfinetune` and their recipes."""

TRAINABLE: dict[str, MethodSpec] = METHODS | EVALUATORS
"""Everything `fit` can run, by config name."""


def method_configs() -> dict[str, type]:
    """Config name -> config dataclass of everything that trains (Config.from_dict's table)."""
    return {name: spec.config for name, spec in TRAINABLE.items()}


def build_method(cfg: Config, init: bool = True) -> Method:
    """The method `cfg` trains, on its backbone (fresh, or an evaluator's checkpoint's); with
    model.init (and `init`), started from that checkpoint's weights (`Method.init_from`)."""
    spec = TRAINABLE[cfg.method.name]
    backbone = spec.backbone(cfg)
    backbone.set_grad_checkpointing(cfg.model.grad_checkpointing)
    method = spec.build(backbone, cfg.method)
    if init and cfg.model.init:
        taken = method.init_from(cfg.model.init)
        log.info("model.init: %s from %s", ", ".join(taken), cfg.model.init)
    return method


def settle_classes(cfg: Config, head: Any, key: str, classes: list[str]) -> None:
    """A classifier's class count (`head.num_classes`, set at `key`) from its training split's
    classes: taken when 0, else it must be the same number. A stream whose metadata names no
    classes takes the stated count (its samples carry their labels); data without labels is
    an error."""
    where = f"the training split {cfg.data.split!r} (data.split) of {cfg.data.path}"
    if classes:
        if head.num_classes and head.num_classes != len(classes):
            named = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            raise ConfigError(
                [
                    f"{key}: {head.num_classes} classes, but {where} has {len(classes)} "
                    f"({named}); set {key} 0 to take the data's count"
                ]
            )
        head.num_classes = len(classes)
    elif not cfg.data.streaming:
        raise DataError(
            f"{cfg.method.name} trains a classifier, but {where} has no labels (an image folder "
            "needs class sub-folders; a dataset, a class column: data.label_column)"
        )
    elif not head.num_classes:
        raise DataError(
            f"{cfg.method.name} trains a classifier: the metadata of {where} names no classes "
            f"(no ClassLabel column, no make_shards index) to count; set {key}"
        )
    else:
        log.info(
            "%s: %d, as set (the stream's metadata names no classes; its labels must be in 0..%d)",
            key,
            head.num_classes,
            head.num_classes - 1,
        )


def prepare(cfg: Config) -> EvalData | None:
    """What the data and model.init decide of `cfg`, settled before the run directory is made
    and any step runs: model.init's architecture (model.name and sizes: the checkpoint's), a
    classifier's or segmenter's classes (`settle_classes`), and with train.eval_every_epochs the
    evaluation data, checked (`eval_data`, `segmentation_data`; data.val_split resolved).
    Returns the evaluation data, or None."""
    m, model = cfg.method, cfg.model
    head = m.deit if isinstance(m, FineTuneConfig) else m  # what holds num_classes, if anything
    classifier = isinstance(head, DeiTConfig | LinearProbeConfig)
    if model.init:
        if cfg.method.name in EVALUATORS:
            raise ConfigError(["model.init: an evaluator starts from --checkpoint"])
        backbone = load_pretrained(model.init, model=model)
        model.name = backbone.name
        for key in ("patch_size", "embed_dim", "depth", "num_heads"):
            setattr(model, key, getattr(backbone, key))
    if isinstance(m, SegProbeConfig | SegFineTuneConfig):  # the masks' classes; split checked
        data = build_segmentation(cfg.data, lambda sample: {}, image_size=model.img_size)
        settle_classes(cfg, m, "method.num_classes", data.classes)
        if not cfg.train.eval_every_epochs:
            return None
        found = segmentation_data(cfg)
        cfg.data.val_split = found.split
        return found
    if cfg.data.streaming and (classifier or cfg.data.path.startswith("hf:")):
        classes = stream_classes(cfg.data)  # nothing read but the stream's metadata
    elif classifier or cfg.data.path.startswith("hf:"):  # a Hub dataset: fails here if offline
        classes = build_dataset(cfg.data, lambda image: {}, image_size=model.img_size).classes
    if classifier:
        key = "method.deit.num_classes" if head is not m else "method.num_classes"
        settle_classes(cfg, head, key, classes)
    if not cfg.train.eval_every_epochs:
        return None
    if cfg.data.streaming:
        raise DataError(
            "train.eval_every_epochs: evaluations read map-style data, not a stream "
            "(data.streaming); evaluate the run's checkpoints afterwards (ssl-vit knn)"
        )
    what = "top-1" if TRAINABLE[m.name].build.classifies else "k-NN"
    try:
        data = eval_data(cfg, what)
    except DataError as e:  # a training run can also do without
        raise DataError(f"{e}; or train without evaluations: train.eval_every_epochs 0") from None
    cfg.data.val_split = data.split
    return data
