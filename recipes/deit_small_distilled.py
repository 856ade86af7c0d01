"""DeiT-S distilled from a RegNetY-16GF teacher by hard distillation (REFERENCE.md § DeiT): 81.2.

    accelerate launch recipes/deit_small_distilled.py --data.path /data/imagenet \
        --method.teacher_weights /weights/regnety_160-a5fe301d.pth

The DeiT-S recipe plus a distillation token and head trained on the teacher's argmax (alpha 0.5);
the prediction is the mean of the two heads. The teacher (timm `regnety_160`, 82.9%, frozen, at
224 px) is the official one: regnety_160-a5fe301d.pth from the DeiT repository, or any timm
RegNetY-16GF state dict; nothing is downloaded. Exports classifier.safetensors for timm's
`deit_small_distilled_patch16_224`.
"""

import sys

from deit_small import config as supervised

from ssl_vit.cli.train import run
from ssl_vit.config import Config


def config() -> Config:
    cfg = supervised()
    cfg.train.output_dir = "runs/deit_small_distilled"
    cfg.method.distillation = "hard"
    cfg.method.alpha, cfg.method.tau = 0.5, 1.0
    cfg.method.teacher, cfg.method.teacher_img_size = "regnety_160", 224
    return cfg


if __name__ == "__main__":
    sys.exit(run(config()))
