"""MAE ViT-B/16 pretraining, the paper's recipe (He et al. 2021, REFERENCE.md § MAE).

    accelerate launch recipes/mae_vitb.py --data.path /data/imagenet

800 epochs at an effective batch of 4096 (reached by gradient accumulation from the per-device
batch and the process count), base lr 1.5e-4 scaled by batch/256, AdamW (0.9, 0.95), weight decay
0.05, 40 warmup epochs then cosine, mask ratio 0.75 with norm-pix targets, RandomResizedCrop
(0.2-1, bicubic) + flip.
"""

import sys

from ssl_vit.cli.train import run
from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig
from ssl_vit.methods.mae import MAEConfig


def config() -> Config:
    return Config(
        model=ModelConfig(name="vit_base_patch16_224", img_size=224),
        data=DataConfig(crop_scale=(0.2, 1.0), interpolation="bicubic", hflip=0.5),
        train=TrainConfig(
            output_dir="runs/mae_vitb",
            epochs=800,
            warmup_epochs=40,
            batch_size=64,
            effective_batch=4096,
            base_lr=1.5e-4,
            lr_batch_divisor=256,
            min_lr=0.0,
            weight_decay=0.05,
        ),
        method=MAEConfig(
            mask_ratio=0.75,
            decoder_dim=512,
            decoder_depth=8,
            decoder_heads=16,
            norm_pix_loss=True,
            betas=(0.9, 0.95),
        ),
    )


if __name__ == "__main__":
    sys.exit(run(config()))
