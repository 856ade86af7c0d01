"""MAE ViT-H/14 pretraining: the ViT-B recipe with the huge, patch-14 encoder (REFERENCE.md § MAE).

accelerate launch recipes/mae_vith.py --data.path /data/imagenet
"""

from mae_vitb import config as vitb

from ssl_vit.cli import run_recipe
from ssl_vit.config import Config


def config() -> Config:
    cfg = vitb()
    cfg.model.name = "vit_huge_patch14_224"
    cfg.train.output_dir = "runs/mae_vith"
    return cfg


if __name__ == "__main__":
    run_recipe(config())
