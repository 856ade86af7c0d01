"""`ssl-vit` console entry: one small module per command, all through `runner.run_command`.

ssl-vit train --method mae [--section.field value ...]
ssl-vit knn --checkpoint RUN_DIR [--section.field value ...]
ssl-vit embed --checkpoint CHECKPOINT --data.path DIR [--embed.output F.parquet ...]
ssl-vit linprobe --checkpoint CHECKPOINT [--protocol mae|dino] [--section.field value ...]
ssl-vit finetune --checkpoint CHECKPOINT [--section.field value ...]
ssl-vit segprobe --checkpoint CHECKPOINT --data.path DATA [--variant dinov3|dinov2] [...]
ssl-vit segfinetune --checkpoint CHECKPOINT --data.path DATA [--method.head eomt|linear] [...]
ssl-vit export --checkpoint CHECKPOINT --output.dir DIR [--section.field value ...]
ssl-vit import --checkpoint CHECKPOINT --output.dir DIR [--section.field value ...]
ssl-vit visualize {attention,mae,pca,pos-embed,attention-distance} --checkpoint CHECKPOINT [...]
accelerate launch recipes/mae_vitb.py [--section.field value ...]
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ssl_vit.cli import embed, knn, train, visualize, weights

USAGE = """usage: ssl-vit COMMAND [--section.field VALUE ...]

commands:
  train   pretrain with a method's default config (--method mae); recipes/ hold the papers' recipes
  knn     weighted k-NN accuracy of any checkpoint's backbone (--checkpoint CHECKPOINT)
  embed   the features of every image of a folder or dataset -> .parquet / .safetensors with ids
  linprobe  linear probe of a frozen backbone, MAE or DINO protocol (--checkpoint, --protocol)
  finetune  fine-tune a backbone end to end, MAE protocol (--checkpoint CHECKPOINT)
  segprobe  linear segmentation probe of a frozen backbone, DINOv3's protocol (mIoU)
  segfinetune  fine-tune a backbone for segmentation end to end, EoMT (or a linear head; mIoU)
  export  a run's backbone (or classifier) or any checkpoint -> a timm pretrained directory
  import  any checkpoint (official MAE/DINO/DeiT .pth, NAME=PATH) -> DIR/backbone/ (timm layout)
  visualize  attention | mae | pca | pos-embed | attention-distance pictures of a checkpoint -> PNG

`ssl-vit COMMAND --help` lists every field of that command with its doc and default. Every
command (and recipe) also takes --config FILE (JSON or YAML) and --print-config (the resolved
config as JSON). The training step benchmark is `python tools/bench.py` (see README § Benchmark)."""

COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": train.train_main,
    "knn": knn.main,
    "embed": embed.main,
    "linprobe": train.linprobe_main,
    "finetune": train.finetune_main,
    "segprobe": train.segprobe_main,
    "segfinetune": train.segfinetune_main,
    "export": weights.export_main,
    "import": weights.import_main,
    "visualize": visualize.main,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        hint = "; the benchmark is `python tools/bench.py`" if command == "bench" else ""
        print(f"error: unknown command {command!r}{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest)
