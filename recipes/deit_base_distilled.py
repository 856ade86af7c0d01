"""DeiT-B distilled from a RegNetY-16GF teacher by hard distillation (REFERENCE.md § DeiT): 83.4.

    accelerate launch recipes/deit_base_distilled.py --data.path /data/imagenet \
        --method.teacher_weights /weights/regnety_160-a5fe301d.pth

The DeiT-S distilled recipe with the ViT-B/16 student (same 300 epochs, batch 1024, lr 5e-4 x
batch/512, drop path 0.1, augmentation, Mixup/CutMix, repeated augmentation and EMA). Exports
classifier.safetensors for timm's `deit_base_distilled_patch16_224`.
"""

import sys

from deit_small_distilled import config as small

from ssl_vit.cli.train import run
from ssl_vit.config import Config


def config() -> Config:
    cfg = small()
    cfg.model.name = "deit_base_patch16_224"
    cfg.train.output_dir = "runs/deit_base_distilled"
    return cfg


if __name__ == "__main__":
    sys.exit(run(config()))
