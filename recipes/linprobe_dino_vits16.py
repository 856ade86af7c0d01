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

from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig
from ssl_vit.eval.linear_probe import LinearProbeConfig, run_evaluator


def config() -> Config:
    return Config(
        model=ModelConfig(name="vit_small_patch16_224", img_size=224),
        data=DataConfig(crop_scale=(0.08, 1.0), interpolation="bicubic", hflip=0.5),
        train=TrainConfig(
            output_dir="runs/linprobe_dino_vits16",
            epochs=100,
            warmup_epochs=0,
            batch_size=128,
            effective_batch=1024,
            optimizer="sgd",
            momentum=0.9,
            base_lr=1e-3,
            lr_batch_divisor=256,
            min_lr=0.0,
            weight_decay=0.0,
            eval_every_epochs=1,
        ),
        method=LinearProbeConfig(
            protocol="dino",
            which="teacher",
            pool="cls",
            n_last=4,
            batchnorm=False,
            head_init_std=0.01,
            lr_grid=(1.0,),
        ),
    )


if __name__ == "__main__":
    sys.exit(run_evaluator(config()))
