"""Training commands: `ssl-vit train`, `ssl-vit linprobe`, `ssl-vit finetune`, `ssl-vit
segprobe`, `ssl-vit segfinetune`, and every recipe (`run(config())`), all through the one
runner and the one loop."""

from __future__ import annotations

import sys
from typing import Any

from ssl_vit.cli.runner import Args, choice, run_command
from ssl_vit.config import Config, ConfigError
from ssl_vit.eval.finetune import finetune_config
from ssl_vit.eval.linear_probe import LinearProbeConfig, linprobe_config
from ssl_vit.eval.pretrained import FROM_CHECKPOINT, from_checkpoint
from ssl_vit.eval.segfinetune import segfinetune_config
from ssl_vit.eval.segprobe import segprobe_config
from ssl_vit.registry import EVALUATORS, METHODS
from ssl_vit.train.loop import fit
from ssl_vit.weights import CHECKPOINT_HELP

EVALUATOR_HELP = "\n\n" + CHECKPOINT_HELP + FROM_CHECKPOINT


def run(cfg: Config, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of a recipe file: `sys.exit(run(config()))`. The command line's
    `--section.field` overrides on `cfg` (an evaluator's also `--checkpoint`), then `fit`; one
    JSON line with the final metrics; exit status 0, or 2 on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or sys.argv[0]
    if cfg.method.name in EVALUATORS:
        return run_command(
            lambda args: cfg, argv, prog, fit_checkpoint, flags={"--checkpoint": ""},
            help_extra=EVALUATOR_HELP,
        )  # fmt: skip
    return run_command(lambda args: cfg, argv, prog, lambda cfg, args: fit(cfg))


def fit_checkpoint(cfg: Config, args: Args) -> dict[str, Any]:
    """An evaluator's run: the checkpoint, what it and the data decide of the config unless the
    command line set it, then `fit`; a linear probe's result adds each head's lr."""
    cfg.method.checkpoint = args["--checkpoint"] or cfg.method.checkpoint
    if not cfg.method.checkpoint:
        raise ConfigError(["--checkpoint: required (a run directory, a file or NAME=PATH)"])
    result = fit(from_checkpoint(cfg, args.given))
    if isinstance(cfg.method, LinearProbeConfig):
        result["head_lr"] = [result["peak_lr"] * m for m in cfg.method.lr_grid]
    return result


def train_main(argv: list[str]) -> int:
    """`ssl-vit train --method NAME [--section.field value ...]`: a method's default config."""

    def config(args: Args) -> Config:
        return Config(method=METHODS[choice(args, "--method", list(METHODS), "method")].config())

    prog = f"ssl-vit train [--method {{{','.join(METHODS)}}}]"
    return run_command(config, argv, prog, lambda cfg, args: fit(cfg), flags={"--method": "mae"})


def linprobe_main(argv: list[str]) -> int:
    """`ssl-vit linprobe --checkpoint C [--protocol mae|dino] [--section.field value ...]`."""
    return run_command(
        lambda args: linprobe_config(choice(args, "--protocol", ("mae", "dino"))),
        argv,
        "ssl-vit linprobe --checkpoint CHECKPOINT [--protocol mae|dino]",
        fit_checkpoint,
        flags={"--checkpoint": "", "--protocol": "mae"},
        help_extra=EVALUATOR_HELP,
    )


def segprobe_main(argv: list[str]) -> int:
    """`ssl-vit segprobe --checkpoint C --data.path D [--variant dinov3|dinov2] [...]`."""
    return run_command(
        lambda args: segprobe_config(choice(args, "--variant", ("dinov3", "dinov2"))),
        argv,
        "ssl-vit segprobe --checkpoint CHECKPOINT --data.path DATA [--variant dinov3|dinov2]",
        fit_checkpoint,
        flags={"--checkpoint": "", "--variant": "dinov3"},
        help_extra=EVALUATOR_HELP,
    )


def segfinetune_main(argv: list[str]) -> int:
    """`ssl-vit segfinetune --checkpoint C --data.path D [--method.head eomt|linear] [...]`."""
    return run(
        segfinetune_config(), argv, "ssl-vit segfinetune --checkpoint CHECKPOINT --data.path DATA"
    )


def finetune_main(argv: list[str]) -> int:
    """`ssl-vit finetune --checkpoint C [--section.field value ...]`."""
    return run(finetune_config(), argv, "ssl-vit finetune --checkpoint CHECKPOINT")
