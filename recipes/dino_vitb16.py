"""DINO ViT-B/16, the released model's settings (its args.txt): k-NN 76.1, linear 78.2.

    accelerate launch recipes/dino_vitb16.py --data.path /data/imagenet

The vanilla ViT-S recipe with the base encoder trained 400 epochs at an effective batch of 1024
(32 per GPU on 32 GPUs; lr 7.5e-4 x batch/256, min lr 2e-6), 10 local crops, crop scales
0.25-1 / 0.05-0.25, teacher temperature warmed up 0.04 -> 0.07 over 50 epochs, the last layer
frozen for 3 epochs; the last-layer norm stays fixed and gradients are clipped per parameter to
0.3 (not the ViT-S 3.0).
"""

import sys

from dino_vits16 import config as vanilla

from ssl_vit.cli.train import run
from ssl_vit.config import Config


def config() -> Config:
    cfg = vanilla()
    cfg.model.name = "vit_base_patch16_224"
    t = cfg.train
    t.output_dir = "runs/dino_vitb16"
    t.epochs, t.batch_size, t.effective_batch = 400, 32, 1024
    t.base_lr, t.min_lr = 7.5e-4, 2e-6
    t.clip_grad = 0.3
    m = cfg.method
    m.teacher_temp, m.warmup_teacher_temp_epochs = 0.07, 50
    m.freeze_last_layer = 3
    m.local_crops = 10
    m.global_crop_scale, m.local_crop_scale = (0.25, 1.0), (0.05, 0.25)
    return cfg


if __name__ == "__main__":
    sys.exit(run(config()))
