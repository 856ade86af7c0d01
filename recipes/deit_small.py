"""DeiT-S, supervised on ImageNet-1k, no teacher (Touvron et al. 2021, REFERENCE.md § DeiT): 79.8.

    accelerate launch recipes/deit_small.py --data.path /data/imagenet

300 epochs at an effective batch of 1024 (the official 4 GPUs x 256; reached by gradient
accumulation on fewer), AdamW (0.9, 0.999), lr 5e-4 x batch/512 with 5 warmup epochs then cosine to
1e-5, weight decay 0.05, drop path 0.1. Training view: RandomResizedCrop (0.08-1, bicubic), flip,
RandAugment m9-mstd0.5-inc1, random erasing 0.25; Mixup 0.8 / CutMix 1.0 (switch 0.5) with label
smoothing 0.1; repeated augmentation x3; model EMA 0.99996. Top-1 on data.val_split (resize 256,
center crop 224: crop ratio 0.875) every epoch. The head has as many classes as the training
split (ImageNet-1k: 1000); pass --method.num_classes to state a count the data must match.
"""

import sys

from ssl_vit.cli.train import run
from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig
from ssl_vit.methods.deit import DeiTConfig


def config() -> Config:
    return Config(
        model=ModelConfig(name="deit_small_patch16_224", img_size=224, drop_path=0.1),
        data=DataConfig(crop_scale=(0.08, 1.0), interpolation="bicubic", hflip=0.5),
        train=TrainConfig(
            output_dir="runs/deit_small",
            epochs=300,
            warmup_epochs=5,
            batch_size=128,
            effective_batch=1024,
            base_lr=5e-4,
            lr_batch_divisor=512,
            min_lr=1e-5,
            weight_decay=0.05,
            eval_every_epochs=1,
        ),
        method=DeiTConfig(
            distillation="none",
            num_classes=0,  # the training split's (ImageNet-1k: 1000); a stated count must match
            mixup=0.8,
            cutmix=1.0,
            mixup_switch_prob=0.5,
            label_smoothing=0.1,
            auto_augment="rand-m9-mstd0.5-inc1",
            color_jitter=0.3,
            reprob=0.25,
            repeated_aug=3,
            model_ema=True,
            model_ema_decay=0.99996,
            betas=(0.9, 0.999),
        ),
    )


if __name__ == "__main__":
    sys.exit(run(config()))
