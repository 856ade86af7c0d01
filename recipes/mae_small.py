"""MAE for small datasets (1k-50k images of 32 px, CIFAR-sized): ViT-Tiny/4 at 32 px with the
settings of solo-learn's CIFAR MAE (scripts/pretrain/cifar/mae.yaml), not ImageNet's.

    accelerate launch recipes/mae_small.py --data.path /data/cifar10

Mask ratio 0.75 with norm-pix targets, a 4-block decoder of width 256 (solo-learn: 8 x 512 for
ViT-S; the lighter decoder suits ViT-Tiny), AdamW (0.9, 0.95), lr 1e-3 x batch/256 (2.5e-4 at
batch 64; the ImageNet recipe's 1.5e-4 is for 800 epochs at batch 4096) with 10 warmup epochs then
cosine, weight decay 0.05, RandomResizedCrop (0.2-1) without flip. 200 epochs; k-NN every 20.
docs/fidelity.md runs it on scikit-learn's digits (the learning check).
"""

import sys

from ssl_vit.cli.train import run
from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig
from ssl_vit.methods.mae import MAEConfig


def config() -> Config:
    return Config(
        model=ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4),
        data=DataConfig(crop_scale=(0.2, 1.0), interpolation="bicubic", hflip=0.0),
        train=TrainConfig(
            output_dir="runs/mae_small",
            epochs=200,
            warmup_epochs=10,
            batch_size=64,
            base_lr=1e-3,
            lr_batch_divisor=256,
            min_lr=0.0,
            weight_decay=0.05,
            eval_every_epochs=20,
        ),
        method=MAEConfig(
            mask_ratio=0.75,
            decoder_dim=256,
            decoder_depth=4,
            decoder_heads=8,
            norm_pix_loss=True,
            betas=(0.9, 0.95),
        ),
    )


if __name__ == "__main__":
    sys.exit(run(config()))
