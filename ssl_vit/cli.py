"""`ssl-vit` console entry and the recipe runner.

ssl-vit train --method mae [--section.field value ...]
ssl-vit bench --method mae [--section.field value ...]
ssl-vit knn --checkpoint RUN_DIR [--section.field value ...]
ssl-vit linprobe --checkpoint CHECKPOINT [--protocol mae|dino] [--section.field value ...]
ssl-vit finetune --checkpoint CHECKPOINT [--section.field value ...]
ssl-vit export --checkpoint CHECKPOINT --output.path FILE.safetensors [--section.field value ...]
ssl-vit import --checkpoint CHECKPOINT --output.dir DIR [--section.field value ...]
ssl-vit visualize {attention,mae,pos-embed,attention-distance} --checkpoint CHECKPOINT [...]
accelerate launch recipes/mae_vitb.py [--section.field value ...]
"""

from __future__ import annotations

import json
import sys

from ssl_vit.config import (
    Config,
    ConfigError,
    apply_overrides,
    help_text,
    parse_args,
    pop_method,
    validate,
)

USAGE = """usage: ssl-vit COMMAND [--section.field VALUE ...]

commands:
  train   pretrain with a method's default config (--method mae); recipes/ hold the papers' recipes
  bench   time a training step of a method against a full-token supervised step
  knn     weighted k-NN accuracy of any checkpoint's backbone (--checkpoint CHECKPOINT)
  linprobe  linear probe of a frozen backbone, MAE or DINO protocol (--checkpoint, --protocol)
  finetune  fine-tune a backbone end to end, MAE protocol (--checkpoint CHECKPOINT)
  export  a run's backbone (or classifier) or any checkpoint -> timm-named safetensors + JSON
  import  any checkpoint (official MAE/DINO/DeiT .pth, NAME=PATH) -> backbone.safetensors + JSON
  visualize  attention | mae | pos-embed | attention-distance pictures of a checkpoint -> PNG

`ssl-vit COMMAND --help` lists every field of that command with its doc and default."""


def configure(cfg: Config, argv: list[str], prog: str) -> Config | None:
    """Apply command-line overrides and validate; None when --help was printed."""
    overrides, want_help = parse_args(argv)
    if want_help:
        print(help_text(cfg, prog))
        return None
    return validate(apply_overrides(cfg, overrides))


def run_recipe(cfg: Config, argv: list[str] | None = None) -> dict | None:
    """Entry point of a recipe file: overrides from the command line, then train."""
    from accelerate import PartialState

    from ssl_vit.data import DataError
    from ssl_vit.trainer import fit

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = configure(cfg, argv, sys.argv[0])
        if cfg is None:
            return None
        result = fit(cfg)
    except (ConfigError, DataError) as e:  # the user's input at fault: the message, no trace
        sys.exit(f"error: {e}")
    if PartialState().is_main_process:  # one result line per launch, not one per process
        print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from ssl_vit.methods import METHODS

            name, rest = pop_method(rest)
            run_recipe(Config(method=METHODS[name].config()), rest)
            return 0
        if command == "bench":
            from ssl_vit.bench import main as bench_main

            return bench_main(rest)
        if command == "knn":
            from ssl_vit.eval.knn import main as knn_main

            return knn_main(rest)
        if command == "linprobe":
            from ssl_vit.eval.linear_probe import main as linprobe_main

            return linprobe_main(rest)
        if command == "finetune":
            from ssl_vit.eval.finetune import main as finetune_main

            return finetune_main(rest)
        if command in ("export", "import"):
            from ssl_vit.checkpoint import export_main, import_main

            return (export_main if command == "export" else import_main)(rest)
        if command == "visualize":
            from ssl_vit.viz.commands import main as visualize_main

            return visualize_main(rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
