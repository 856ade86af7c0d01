"""The explicit table of pretext methods: name -> (config dataclass, model builder, data view)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ssl_vit.data.transforms import single_view
from ssl_vit.methods.mae import MAE, MAEConfig


class MethodSpec(NamedTuple):
    config: type
    """The method's config dataclass; its `name` class attribute is the table key."""
    build: Callable[..., Any]
    """build(backbone, method_cfg) -> nn.Module with training_step(batch) -> {"loss", ...}."""
    view: Callable[..., Callable[[Any], dict]]
    """view(cfg: Config) -> per-sample transform: image -> {"images": ...} or {"crops": [...]}."""
    sampler: Callable[..., Any] | None = None
    """sampler(cfg, dataset_len, num_processes) -> the global sample order of an epoch (with
    set_epoch), e.g. repeated augmentation; None = shuffling."""


METHODS: dict[str, MethodSpec] = {
    "mae": MethodSpec(MAEConfig, MAE, lambda cfg: single_view(cfg.data, cfg.model.img_size)),
}
