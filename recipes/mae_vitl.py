"""MAE ViT-L/16 pretraining: the ViT-B recipe with the large encoder (REFERENCE.md § MAE).

accelerate launch recipes/mae_vitl.py --data.path /data/imagenet
"""

import sys

from mae_vitb import config as vitb

from ssl_vit.cli.train import run
from ssl_vit.config import Config


def config() -> Config:
    cfg = vitb()
    cfg.model.name = "vit_large_patch16_224"
    cfg.train.output_dir = "runs/mae_vitl"
    return cfg


if __name__ == "__main__":
    sys.exit(run(config()))
