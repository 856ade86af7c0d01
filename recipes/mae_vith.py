"""MAE ViT-H/14 pretraining: the ViT-B recipe with the huge, patch-14 encoder (REFERENCE.md § MAE).

accelerate launch recipes/mae_vith.py --data.path /data/imagenet
"""

import sys

from mae_vitb import config as vitb

from ssl_vit.cli.train import run
from ssl_vit.config import Config


def config() -> Config:
    cfg = vitb()
    cfg.model.name = "vit_huge_patch14_224"
    cfg.train.output_dir = "runs/mae_vith"
    return cfg


if __name__ == "__main__":
    sys.exit(run(config()))
