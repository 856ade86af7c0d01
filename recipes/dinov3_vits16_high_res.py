"""DINOv3 ViT-S/16, the high-resolution adaptation: after recipes/dinov3_vits16.py, a short phase
in which each step's crops are drawn at one of several sizes (docs/fidelity.md § DINOv3).

    accelerate launch recipes/dinov3_vits16_high_res.py --data.path /data/imagenet \\
        --model.init runs/dinov3_vits16

The official adaptation's size choices (dinov3_vit7b16_high_res_adapt.yaml), global / local /
Gram-teacher crop sides and their probabilities: 512 / 112 / 768 (0.3), 768 / 112 / 1152 (0.3),
768 / 168 / 1152 (0.3), 768 / 224 / 1152 (0.05), 768 / 336 / 1152 (0.05); the same choice on every
process at each step. Its Gram loss: weight 1.5, one similarity matrix per image, the Gram
teacher the starting weights, never refreshed. Its teacher: temperature 0.07, momentum 0.999;
weight decay 0.04; a low lr. RoPE backbones take every size as it is.
"""

import sys

from dinov3_vits16 import config as dinov3_vits16

from ssl_vit.cli.train import run
from ssl_vit.config import Config


def config() -> Config:
    """recipes/dinov3_vits16.py with the adaptation's sizes, Gram loss and schedules."""
    cfg = dinov3_vits16()
    t, m = cfg.train, cfg.method
    t.output_dir, t.epochs, t.warmup_epochs = "runs/dinov3_vits16_high_res", 3, 0
    t.base_lr, t.min_lr, t.weight_decay, t.weight_decay_end = 1.25e-5, 1.25e-5, 0.04, 0.04
    cfg.model.img_size = 768  # the largest global crop: the size FLOP counts and pictures use
    m.mixed_sizes = (512, 768, 768, 768, 768)
    m.mixed_local_sizes = (112, 112, 168, 224, 336)
    m.mixed_teacher_sizes = (768, 1152, 1152, 1152, 1152)
    m.mixed_ratios = (0.3, 0.3, 0.3, 0.05, 0.05)
    m.momentum_teacher, m.teacher_temp, m.warmup_teacher_temp = 0.999, 0.07, 0.07
    m.gram.loss_weight, m.gram.img_level = 1.5, True
    m.gram.it_load_ema_teacher, m.gram.update_frequency = 0, 10**9  # the start's, kept
    return cfg


if __name__ == "__main__":
    sys.exit(run(config()))
