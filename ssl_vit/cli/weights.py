"""`ssl-vit export` (any checkpoint, or a run's backbone or classifier -> a directory in timm's
pretrained layout, config.json + model.safetensors) and `ssl-vit import` (any checkpoint -> a
run-like directory every command takes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ssl_vit.cli.runner import Args, run_command
from ssl_vit.config import ConfigError
from ssl_vit.weights import CHECKPOINT_HELP, LoadConfig, export_checkpoint, import_checkpoint


@dataclass
class ExportOutput:
    dir: str = ""
    """The directory to write (required): config.json + model.safetensors, as timm's save_for_hf;
    `timm.create_model("local-dir:DIR", pretrained=True)` loads it, and it can be pushed to the
    Hugging Face Hub as it is."""
    what: Literal["auto", "backbone", "classifier", "backbone_ema", "classifier_ema"] = "auto"
    """auto: a run directory's classifier when it trained one, else the backbone; the _ema ones:
    a run's model EMA (DeiT, fine-tuning)."""


@dataclass
class ExportRoot:
    """What `ssl-vit export` runs."""

    output: ExportOutput = field(default_factory=ExportOutput)
    load: LoadConfig = field(default_factory=LoadConfig)


@dataclass
class ImportOutput:
    dir: str = ""
    """Directory to write backbone/ into (timm's pretrained layout; required, created), usable as
    --checkpoint by every command."""
    overwrite: bool = False
    """Replace a backbone already in output.dir."""


@dataclass
class ImportRoot:
    """What `ssl-vit import` runs."""

    output: ImportOutput = field(default_factory=ImportOutput)
    load: LoadConfig = field(default_factory=LoadConfig)


def checked(root: ExportRoot | ImportRoot, args: Args, output: str, what: str) -> str:
    """The checkpoint, once every option is valid (ConfigError lists the others)."""
    errors = root.load.errors()
    if not args["--checkpoint"]:
        errors.append("--checkpoint: required")
    if not output:
        errors.append(what)
    if errors:
        raise ConfigError(errors)
    return args["--checkpoint"]


def export(root: ExportRoot, args: Args) -> dict[str, Any]:
    o, load = root.output, root.load
    checkpoint = checked(root, args, o.dir, "--output.dir: required (the directory to write)")
    kw = dict(model=load.model(), which=load.which, pos_interp=load.interp("bicubic", checkpoint))
    return export_checkpoint(checkpoint, o.dir, what=o.what, **kw)


def import_(root: ImportRoot, args: Args) -> dict[str, Any]:
    o, load = root.output, root.load
    checkpoint = checked(
        root, args, o.dir, "--output.dir: required (the directory to write the backbone to)"
    )
    kw = dict(model=load.model(), which=load.which, pos_interp=load.interp("bicubic", checkpoint))
    return import_checkpoint(checkpoint, o.dir, overwrite=o.overwrite, **kw)


def export_main(argv: list[str]) -> int:
    """`ssl-vit export --checkpoint X --output.dir DIR`: one JSON line; 2 on errors."""
    prog = "ssl-vit export --checkpoint CHECKPOINT"
    return run_command(
        lambda args: ExportRoot(), argv, prog, export, flags={"--checkpoint": ""},
        help_extra="\n\n" + CHECKPOINT_HELP,
    )  # fmt: skip


def import_main(argv: list[str]) -> int:
    """`ssl-vit import --checkpoint X --output.dir D`: one JSON line; 2 on errors."""
    prog = "ssl-vit import --checkpoint CHECKPOINT"
    return run_command(
        lambda args: ImportRoot(), argv, prog, import_, flags={"--checkpoint": ""},
        help_extra="\n\n" + CHECKPOINT_HELP,
    )  # fmt: skip
