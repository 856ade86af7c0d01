"""DINOv3 ViT-S/16: continued pretraining from the official weights with the DINOv3 objective
(Siméoni et al. 2025; docs/fidelity.md § DINOv3): DINOv2's losses with DINOv3's defaults plus
Gram anchoring (methods/dinov3.py).

    accelerate launch recipes/dinov3_vits16.py --data.path /data/imagenet \\
        --model.init dinov3_vits16_pretrain_lvd1689m.pth

(--model.init: an official DINOv3 file, or a timm hub name; without it, from scratch on timm's
`vit_small_patch16_dinov3`). 224 px, 2 global crops (scale 0.32-1) + 8 local crops of 96 px
(0.05-0.32); separate DINO and iBOT heads of 65536 prototypes, loss weights 1 / 1 / KoLeo 0.1,
half the global crops block-masked at 10-50%, Sinkhorn-Knopp teacher targets; Gram loss weight 1,
the Gram teacher copied from the EMA teacher at the first iteration and refreshed every 10000
iterations. A short schedule at a low lr, as befits continued pretraining: 10 epochs at an
effective batch of 1024, lr 5e-4, 1 warmup epoch then cosine to 1e-6, teacher momentum 0.994 -> 1,
the teacher temperature at 0.07 from the start. Not here: the high-resolution phase.
"""

import sys

from ssl_vit.cli.train import run
from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig
from ssl_vit.methods.dinov3 import DINOv3Config, GramConfig


def config() -> Config:
    return Config(
        model=ModelConfig(name="vit_small_patch16_dinov3", img_size=224, drop_path=0.1),
        data=DataConfig(interpolation="bicubic", hflip=0.5),
        train=TrainConfig(
            output_dir="runs/dinov3_vits16",
            epochs=10,
            warmup_epochs=1,
            batch_size=64,
            effective_batch=1024,
            base_lr=5e-4,
            lr_batch_divisor=1024,
            min_lr=1e-6,
            weight_decay=0.04,
            weight_decay_end=0.04,
            clip_grad=3.0,
            eval_every_epochs=5,
        ),
        method=DINOv3Config(
            out_dim=65536,
            ibot_separate_head=True,
            ibot_out_dim=65536,
            dino_loss_weight=1.0,
            ibot_loss_weight=1.0,
            koleo_loss_weight=0.1,
            mask_ratio_min_max=(0.1, 0.5),
            mask_sample_probability=0.5,
            centering="sinkhorn_knopp",
            warmup_teacher_temp=0.07,
            teacher_temp=0.07,
            warmup_teacher_temp_epochs=0,
            momentum_teacher=0.994,
            freeze_last_layer=1,
            layerwise_decay=0.9,
            patch_embed_lr_mult=0.2,
            local_crops=8,
            local_crop_size=96,
            global_crop_scale=(0.32, 1.0),
            local_crop_scale=(0.05, 0.32),
            gram=GramConfig(
                loss_weight=1.0, it_load_ema_teacher=0, update_frequency=10000, it_first_update=0
            ),
        ),
    )


if __name__ == "__main__":
    sys.exit(run(config()))
