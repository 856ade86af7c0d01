"""Where an evaluator's backbone comes from: the checkpoint in method.checkpoint, and what that
checkpoint and the data decide of the run's config unless the user set it."""

from __future__ import annotations

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config, ConfigError, ModelConfig
from ssl_vit.eval.linear_probe import LinearProbeConfig, probe_features
from ssl_vit.weights import load_pretrained

FROM_CHECKPOINT = """
model.name, model.img_size and model.patch_size default to the checkpoint's own (a different
img_size resamples the position embedding); num_classes 0 (method.num_classes, fine-tuning's
method.deit.num_classes) counts the training split's."""


def pretrained_backbone(cfg: Config) -> Backbone:
    """The backbone an evaluator starts from (MethodSpec.backbone): method.checkpoint built for
    cfg.model — its image size (position embedding resampled, bicubic) and drop path."""
    return load_pretrained(cfg.method.checkpoint, model=cfg.model, which=cfg.method.which)


def from_checkpoint(cfg: Config, given: set[str]) -> Config:
    """Fill what the checkpoint decides, unless the command line `given` it: model.name /
    img_size / patch_size from the checkpoint's backbone, and a linear probe's 'auto' features
    (the classes: registry.prepare)."""
    head_only = ModelConfig(img_size=0, num_heads=cfg.model.num_heads)
    backbone = load_pretrained(cfg.method.checkpoint, model=head_only, which=cfg.method.which)
    size = backbone.grid_size[0] * backbone.patch_size
    arch = {"name": backbone.name, "img_size": size, "patch_size": backbone.patch_size}
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
