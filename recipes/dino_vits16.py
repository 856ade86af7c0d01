"""DINO ViT-S/16, the vanilla 100-epoch run (Caron et al. 2021, REFERENCE.md § DINO): k-NN 69.3.

    accelerate launch recipes/dino_vits16.py --data.path /data/imagenet

Effective batch 1024 (the paper's 16 GPUs x 64; reached by gradient accumulation on fewer), lr
5e-4 x batch/256 with 10 warmup epochs then cosine to 1e-6, AdamW, weight decay cosine 0.04 -> 0.4,
each parameter's gradient clipped to norm 3, drop path 0.1 in the student. 2 global crops of 224 px
(scale 0.4-1) + 8 local crops of 96 px (0.05-0.4); teacher temperature 0.04 (no warmup), student
0.1, center momentum 0.9, teacher momentum 0.996 -> 1, last layer frozen for the first epoch.
k-NN (k = 20, T = 0.07) of the teacher on data.val_split every 10 epochs.
"""

import sys

from ssl_vit.cli.train import run
from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig
from ssl_vit.methods.dino import DINOConfig


def config() -> Config:
    return Config(
        model=ModelConfig(name="vit_small_patch16_224", img_size=224, drop_path=0.1),
        data=DataConfig(interpolation="bicubic", hflip=0.5),
        train=TrainConfig(
            output_dir="runs/dino_vits16",
            epochs=100,
            warmup_epochs=10,
            batch_size=64,
            effective_batch=1024,
            base_lr=5e-4,
            lr_batch_divisor=256,
            min_lr=1e-6,
            weight_decay=0.04,
            weight_decay_end=0.4,
            clip_grad=3.0,
            clip_mode="param",
            eval_every_epochs=10,
        ),
        method=DINOConfig(
            out_dim=65536,
            norm_last_layer=True,
            warmup_teacher_temp=0.04,
            teacher_temp=0.04,
            warmup_teacher_temp_epochs=0,
            student_temp=0.1,
            center_momentum=0.9,
            momentum_teacher=0.996,
            freeze_last_layer=1,
            local_crops=8,
            local_crop_size=96,
            global_crop_scale=(0.4, 1.0),
            local_crop_scale=(0.05, 0.4),
            betas=(0.9, 0.999),
        ),
    )


if __name__ == "__main__":
    sys.exit(run(config()))
