r"""MAE linear probe of a ViT-B/16 (He et al. 2021, REFERENCE.md § MAE): 68.0 top-1.

    accelerate launch recipes/linprobe_mae_vitb.py --checkpoint runs/mae_vitb \
        --data.path /data/imagenet

The frozen backbone's cls token through BatchNorm1d(affine=False, eps 1e-6) into a linear head
(trunc_normal std 0.01). 90 epochs at an effective batch of 16384 (the official 32 GPUs x 512;
reached by gradient accumulation on fewer), LARS (momentum 0.9, trust 0.001; biases neither adapted
nor decayed), base lr 0.1 x batch/256 (lr 6.4), weight decay 0, 10 warmup epochs then cosine to 0.
RandomResizedCrop (0.08-1, bicubic) + flip; top-1/top-5 on data.val_split (resize 256, center crop
224) every epoch. The model section is the checkpoint's own (`--model.img_size` resamples it).
`--method.lr_grid 0.5,1,2` trains one head per lr multiple in the same pass.
"""

import sys

from ssl_vit.cli.train import run
from ssl_vit.config import Config, ModelConfig
from ssl_vit.eval.linear_probe import linprobe_config


def config() -> Config:
    cfg = linprobe_config("mae")  # the protocol: LARS, lr, schedule, BatchNorm head, evaluation
    cfg.model = ModelConfig(name="vit_base_patch16_224", img_size=224)
    cfg.train.output_dir = "runs/linprobe_mae_vitb"
    cfg.train.batch_size, cfg.train.effective_batch = 512, 16384
    cfg.method.pool, cfg.method.n_last = "cls", 1
    return cfg


if __name__ == "__main__":
    sys.exit(run(config()))
