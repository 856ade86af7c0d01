r"""MAE fine-tuning of a ViT-B/16 (He et al. 2021, REFERENCE.md § MAE): 83.6 top-1.

    accelerate launch recipes/finetune_mae_vitb.py --checkpoint runs/mae_vitb \
        --data.path /data/imagenet

100 epochs at an effective batch of 1024 (reached by gradient accumulation), AdamW (0.9, 0.999),
base lr 5e-4 x batch/256 (lr 2e-3), weight decay 0.05 (none on biases, norms, tokens, position
embedding), layer-wise lr decay 0.65, drop path 0.1, 5 warmup epochs then cosine to 1e-6.
RandomResizedCrop (0.08-1, bicubic), flip, RandAugment m9-mstd0.5-inc1, random erasing 0.25;
Mixup 0.8 / CutMix 1.0 (switch 0.5) with label smoothing 0.1. Global average pool of the patch
tokens through a fresh fc_norm, head init std 2e-5. Top-1/top-5 on data.val_split (resize 256,
center crop 224) every epoch; the run exports classifier.safetensors (last) and
classifier_best.safetensors, timm-loadable. `--model.img_size 384` fine-tunes at 384 px (position
embedding resampled). ViT-L: `--method.layer_decay 0.75 --model.drop_path 0.2 --train.epochs 50`.
"""

import sys

from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig
from ssl_vit.eval.finetune import FineTuneConfig
from ssl_vit.eval.linear_probe import run_evaluator


def config() -> Config:
    return Config(
        model=ModelConfig(name="vit_base_patch16_224", img_size=224, drop_path=0.1),
        data=DataConfig(crop_scale=(0.08, 1.0), interpolation="bicubic", hflip=0.5),
        train=TrainConfig(
            output_dir="runs/finetune_mae_vitb",
            epochs=100,
            warmup_epochs=5,
            batch_size=128,
            effective_batch=1024,
            optimizer="adamw",
            base_lr=5e-4,
            lr_batch_divisor=256,
            min_lr=1e-6,
            weight_decay=0.05,
            eval_every_epochs=1,
        ),
        method=FineTuneConfig(
            global_pool="avg",
            layer_decay=0.65,
            head_init_std=2e-5,
            mixup=0.8,
            cutmix=1.0,
            mixup_switch_prob=0.5,
            label_smoothing=0.1,
            auto_augment="rand-m9-mstd0.5-inc1",
            reprob=0.25,
            model_ema=False,
            betas=(0.9, 0.999),
        ),
    )


if __name__ == "__main__":
    sys.exit(run_evaluator(config()))
