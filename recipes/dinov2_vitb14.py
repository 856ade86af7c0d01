"""DINOv2 ViT-B/14 from scratch: recipes/dinov2_vits14.py (the official default objective, Oquab et
al. 2023; docs/fidelity.md § DINOv2) with the base encoder.

    accelerate launch recipes/dinov2_vitb14.py --data.path /data/imagenet
    accelerate launch recipes/dinov2_vitb14.py --model.name vit_base_patch14_reg4_dinov2

(the second: 4 register tokens). The official repository has no ViT-B/14 training config (its
released ViT-B/14 was distilled from ViT-g/14), so the values come from two files of it:
dinov2/configs/ssl_default_config.yaml for the objective and schedule (100 epochs at an effective
batch of 1024, 64 per GPU, lr 0.004: the base lr at batch 1024, scaling linearly here, by the square
root there; 10 warmup epochs then cosine to 1e-6, AdamW, weight decay cosine 0.04 -> 0.4, gradient
norm clipped to 3, layer-wise lr decay 0.9, patch embedding lr x 0.2; DINO and iBOT heads of 65536
prototypes, bottleneck 256, shared; loss weights 1 / 1 / KoLeo 0.1, half the global crops
block-masked at 10-50%; teacher temperature 0.04 -> 0.07 over 30 epochs, student 0.1, teacher
momentum 0.992 -> 1, last layers frozen for the first epoch; 2 global crops of 224 px (scale
0.32-1) + 8 local crops (0.05-0.32)), and dinov2/configs/train/vitl14.yaml for what its patch-14
runs change: local crops of 98 px and Sinkhorn-Knopp teacher targets. Not taken from vitl14.yaml:
its 500 epochs, lr 2e-4, 80 warmup epochs, no layer decay, separate 131072-prototype heads and
SwiGLU, all sized for ViT-L on ImageNet-22k. Drop path 0.1 is this recipe's (DINO's ViT-B value;
the default's 0.3 is for ViT-L). timm's DINOv2 ViT-B/14 at 224 px: layer scale 1e-5, 16 x 16
patches. k-NN of the teacher every 10 epochs.
"""

import sys

from dinov2_vits14 import config as vits14

from ssl_vit.cli.train import run
from ssl_vit.config import Config


def config(registers: bool = False) -> Config:
    """registers: timm's vit_base_patch14_reg4_dinov2 (4 register tokens, Darcet et al.)."""
    cfg = vits14(registers)
    cfg.model.name = "vit_base_patch14_reg4_dinov2" if registers else "vit_base_patch14_dinov2"
    cfg.train.output_dir = "runs/dinov2_vitb14"
    return cfg


if __name__ == "__main__":
    sys.exit(run(config()))
