"""Where an evaluator's backbone comes from: the checkpoint in method.checkpoint, and what that
checkpoint and the data decide of the run's config unless the user set it."""

from __future__ import annotations

from ssl_vit.backbone import Backbone, PosInterp
from ssl_vit.config import Config, ConfigError, ModelConfig
from ssl_vit.eval.linear_probe import LinearProbeConfig, probe_features
from ssl_vit.eval.segfinetune import SegFineTuneConfig
from ssl_vit.eval.segprobe import SegProbeConfig
from ssl_vit.weights import load_pretrained, official_interp

FROM_CHECKPOINT = """
model.name, model.img_size and model.patch_size default to the checkpoint's own (a different
img_size resamples the position embedding by method.pos_interp; segprobe, segfinetune: img_size
is the crop,
512); num_classes 0
(method.num_classes, fine-tuning's method.deit.num_classes) counts the training split's."""


def protocol_interp(cfg: Config) -> PosInterp:
    """How the evaluator resizes the checkpoint's position embedding: method.pos_interp, or for
    auto an official DINOv2 file's own formula (weights.official_interp), else the official
    formula of the protocol it runs: MAE's linear probe and fine-tuning
    (util/pos_embed.interpolate_pos_embed; DeiT's main.py, for distilled checkpoints) bicubic
    without antialiasing; DINO's linear probe its interpolate_pos_encoding ('offset')."""
    m = cfg.method
    if m.pos_interp != "auto":
        return m.pos_interp
    if official := official_interp(m.checkpoint, m.which):
        return official
    return "offset" if isinstance(m, LinearProbeConfig) and m.protocol == "dino" else "bicubic"


def pretrained_backbone(cfg: Config) -> Backbone:
    """The backbone an evaluator starts from (MethodSpec.backbone): method.checkpoint built for
    cfg.model — its image size (position embedding resampled by `protocol_interp`) and drop
    path."""
    m = cfg.method
    return load_pretrained(
        m.checkpoint, model=cfg.model, which=m.which, pos_interp=protocol_interp(cfg)
    )


def from_checkpoint(cfg: Config, given: set[str]) -> Config:
    """Fill what the checkpoint decides, unless the command line `given` it: model.name /
    img_size / patch_size from the checkpoint's backbone, and a linear probe's 'auto' features
    (the classes: registry.prepare)."""
    head_only = ModelConfig(img_size=0, num_heads=cfg.model.num_heads)
    backbone = load_pretrained(cfg.method.checkpoint, model=head_only, which=cfg.method.which)
    size = backbone.grid_size[0] * backbone.patch_size
    arch = {"name": backbone.name, "img_size": size, "patch_size": backbone.patch_size}
    if isinstance(cfg.method, SegProbeConfig | SegFineTuneConfig):  # the protocol's crop stands
        del arch["img_size"]
    for key, value in arch.items():
        if f"model.{key}" not in given:
            setattr(cfg.model, key, value)
    m = cfg.method
    if isinstance(m, LinearProbeConfig):
        m.pool, m.n_last = probe_features(
            m.protocol, m.pool, m.n_last, backbone.embed_dim, backbone.depth
        )
        if m.n_last > backbone.depth:
            raise ConfigError([f"method.n_last: {m.n_last} exceeds the depth {backbone.depth}"])
    return cfg
