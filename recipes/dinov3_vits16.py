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
the teacher temperature at 0.07 from the start. Then the high-resolution adaptation:
recipes/dinov3_vits16_high_res.py.
"""

import dataclasses
import sys

from dinov2_vits14 import config as dinov2_vits14

from ssl_vit.cli.train import run
from ssl_vit.config import Config
from ssl_vit.methods.dinov3 import DINOv3Config, GramConfig


def config() -> Config:
    """recipes/dinov2_vits14.py's objective and optimiser with what DINOv3 changes."""
    cfg = dinov2_vits14()
    cfg.model.name = "vit_small_patch16_dinov3"
    t = cfg.train
    t.output_dir, t.epochs, t.warmup_epochs, t.base_lr = "runs/dinov3_vits16", 10, 1, 5e-4
    t.weight_decay_end, t.eval_every_epochs = 0.04, 5
    shared = {f.name: getattr(cfg.method, f.name) for f in dataclasses.fields(cfg.method)}
    cfg.method = DINOv3Config(
        **shared
        | dict(
            ibot_separate_head=True,
            ibot_out_dim=65536,
            warmup_teacher_temp=0.07,
            warmup_teacher_temp_epochs=0,
            momentum_teacher=0.994,
            local_crop_size=96,
            gram=GramConfig(
                loss_weight=1.0, it_load_ema_teacher=0, update_frequency=10000, it_first_update=0
            ),
        )
    )
    return cfg


if __name__ == "__main__":
    sys.exit(run(config()))
