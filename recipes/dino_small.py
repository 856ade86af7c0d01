"""DINO for small datasets (1k-50k images of 32 px, CIFAR-sized): ViT-Tiny/4 at 32 px with the head
of solo-learn's CIFAR DINO (scripts/pretrain/cifar/dino.yaml; a ResNet-18 there), not ImageNet's.

    accelerate launch recipes/dino_small.py --data.path /data/cifar10

Why not recipes/dino_vits16.py: on ~1,400 images for ~440 steps its teacher momentum 0.996 -> 1
leaves exp(-(1 - 0.996)(440 + 1) / 2) = 41% of the teacher at its random initialisation at the end
(ops.ema_init_share), and with 65,536 prototypes the teacher collapses to the uniform distribution.
Here, as solo-learn: 4,096 prototypes and BatchNorm in the head (DINO's --use_bn_in_head; it
spreads the outputs of the near-identical images a random ViT sees, where without it the teacher
turns uniform within 30 steps on digits even with a fast EMA), no blur (2 px is a large part of a
32 px image); teacher momentum 0.99 -> 1 (solo-learn: 0.9995 over 1,000 epochs; 0.99 is an EMA time
constant of 100 steps; keep (1 - m)(T + 1) / 2 >= 5 for a run of T steps, i.e. m <= 1 - 10 / T;
DINO's collapse warning computes it), teacher temperature 0.04, student 0.1, center momentum 0.9;
AdamW, lr 2e-3 x batch/256 (5e-4 at batch 64) with 10 warmup epochs then cosine to 1e-6, weight
decay 0.04 -> 0.4, each parameter's gradient clipped to 3, no drop path; 2 global crops of 32 px
(scale 0.25-1) + 4 local crops of 16 px (0.05-0.4), no flip. 100 epochs; k-NN every 10.
docs/fidelity.md runs it on scikit-learn's digits (the learning check), 880 steps with no local
crops (a 16 px crop of an 8 x 8 digit shows a few of its pixels), global crops of scale 0.5-1 and
teacher temperature 0.02: k-NN +30 and linear probe +30 points over a random backbone.
"""

import sys

from ssl_vit.cli.train import run
from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig
from ssl_vit.methods.dino import DINOConfig


def config() -> Config:
    return Config(
        model=ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4),
        data=DataConfig(interpolation="bicubic", hflip=0.0),
        train=TrainConfig(
            output_dir="runs/dino_small",
            epochs=100,
            warmup_epochs=10,
            batch_size=64,
            base_lr=2e-3,
            lr_batch_divisor=256,
            min_lr=1e-6,
            weight_decay=0.04,
            weight_decay_end=0.4,
            clip_grad=3.0,
            clip_mode="param",
            eval_every_epochs=10,
        ),
        method=DINOConfig(
            out_dim=4096,
            hidden_dim=2048,
            bottleneck_dim=256,
            use_bn_in_head=True,
            warmup_teacher_temp=0.04,
            teacher_temp=0.04,
            momentum_teacher=0.99,
            freeze_last_layer=1,
            local_crops=4,
            local_crop_size=16,
            global_crop_scale=(0.25, 1.0),
            local_crop_scale=(0.05, 0.4),
            blur=False,
        ),
    )


if __name__ == "__main__":
    sys.exit(run(config()))
