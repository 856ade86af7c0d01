r"""DINO linear evaluation of a ViT-S/16 (Caron et al. 2021, REFERENCE.md § DINO): 74.0 top-1 for
the vanilla 100-epoch run, 77.0 for the released one.

    accelerate launch recipes/linprobe_dino_vits16.py --checkpoint runs/dino_vits16 \
        --data.path /data/imagenet

The frozen backbone's last 4 blocks' cls tokens (each through the final norm), concatenated, into a
linear head (std 0.01, bias 0; no BatchNorm). 100 epochs at an effective batch of 1024 (the official
8 GPUs x 128), SGD momentum 0.9, lr 1e-3 x batch/256 (0.004), weight decay 0, cosine to 0 (per
iteration; the official steps it per epoch). RandomResizedCrop (0.08-1, bicubic) + flip; top-1/top-5
on data.val_split (resize 256, center crop 224) every epoch. For a ViT-B/16 checkpoint DINO reads
the last cls token + the average-pooled patch tokens: `--method.pool cls_avgpool --method.n_last 1`.
"""

import sys

from ssl_vit.cli.train import run
from ssl_vit.config import Config, ModelConfig
from ssl_vit.eval.linear_probe import linprobe_config


def config() -> Config:
    cfg = linprobe_config("dino")  # the protocol: SGD, lr, schedule, no BatchNorm, evaluation
    cfg.model = ModelConfig(name="vit_small_patch16_224", img_size=224)
    cfg.train.output_dir = "runs/linprobe_dino_vits16"
    cfg.train.batch_size, cfg.train.effective_batch = 128, 1024
    cfg.method.which, cfg.method.pool, cfg.method.n_last = "teacher", "cls", 4
    return cfg


if __name__ == "__main__":
    sys.exit(run(config()))
