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

from ssl_vit.cli.train import run
from ssl_vit.config import Config, ModelConfig
from ssl_vit.eval.finetune import finetune_config


def config() -> Config:
    cfg = finetune_config()  # the protocol: AdamW, schedule, layer decay, augmentation, head
    cfg.model = ModelConfig(name="vit_base_patch16_224", img_size=224, drop_path=0.1)
    cfg.train.output_dir = "runs/finetune_mae_vitb"
    cfg.train.batch_size, cfg.train.effective_batch = 128, 1024
    return cfg


if __name__ == "__main__":
    sys.exit(run(config()))
