"""`ssl-vit export` (any checkpoint, or a run's backbone or classifier -> a timm-named safetensors
+ JSON) and `ssl-vit import` (any checkpoint -> a run-like directory every command takes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ssl_vit.cli.runner import Args, run_command
from ssl_vit.config import ConfigError
from ssl_vit.weights import CHECKPOINT_HELP, LoadConfig, export_checkpoint, import_checkpoint


@dataclass
class ExportOutput:
    path: str = ""
    """The .safetensors file to write (required); the timm name and kwargs go to the .json beside
    it: `timm.create_model(name, **kwargs)` loads it with strict=True."""
    what: Literal["auto", "backbone", "classifier"] = "auto"
    """auto: a run directory's classifier when it wrote classifier.safetensors, else the
    backbone."""


@dataclass
class ExportRoot:
    """What `ssl-vit export` runs."""

    output: ExportOutput = field(default_factory=ExportOutput)
    load: LoadConfig = field(default_factory=LoadConfig)


@dataclass
class ImportOutput:
    dir: str = ""
    """Directory to write backbone.safetensors + backbone.json into (required; created), usable
    as --checkpoint by every command."""
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
    checkpoint = checked(
        root, args, o.path, "--output.path: required (the .safetensors file to write)"
    )
    return export_checkpoint(checkpoint, o.path, what=o.what, model=load.model(), which=load.which)


def import_(root: ImportRoot, args: Args) -> dict[str, Any]:
    o, load = root.output, root.load
    checkpoint = checked(
        root, args, o.dir, "--output.dir: required (the directory to write the backbone to)"
    )
    return import_checkpoint(
        checkpoint, o.dir, model=load.model(), which=load.which, overwrite=o.overwrite
    )


def export_main(argv: list[str]) -> int:
    """`ssl-vit export --checkpoint X --output.path F.safetensors`: one JSON line; 2 on errors."""
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
