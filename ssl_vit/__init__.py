"""ssl_vit: self-supervised pretraining for Vision Transformers on one timm backbone and one
Accelerate loop."""

from ssl_vit.backbone import Backbone, BackboneOutput
from ssl_vit.checkpoint import (
    CheckpointError,
    export_backbone,
    latest_checkpoint,
    load_backbone,
    load_pretrained,
)
from ssl_vit.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from ssl_vit.methods import METHODS
from ssl_vit.methods.mae import MAE, MAEConfig
from ssl_vit.trainer import fit

__all__ = [
    "METHODS",
    "MAE",
    "Backbone",
    "BackboneOutput",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataConfig",
    "MAEConfig",
    "ModelConfig",
    "TrainConfig",
    "export_backbone",
    "fit",
    "latest_checkpoint",
    "load_backbone",
    "load_pretrained",
]
