"""The one command runner: every `ssl-vit` subcommand and every recipe goes through `run_command`.

flags that shape the command (--checkpoint, --protocol, --method) -> a config file's values
(--config FILE, JSON or YAML) -> the config tree's `--section.field value` overrides -> --help,
--print-config (the resolved tree as JSON, reusable as --config), or the command's action -> its
result as one JSON line on stdout (main process only), exit status 0. Bad input: one clear
message on stderr, exit status 2, no traceback; a run that cannot go on (it diverged, a full
disk, a stuck loader worker, out of memory): the same, exit status 1; a run stopped by a signal
after its checkpoint (train.preemption): a line naming it, exit status 75.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import PartialState

from ssl_vit.config import (
    Config,
    ConfigError,
    apply_overrides,
    help_text,
    parse_args,
    pop_flag,
    read_config,
)
from ssl_vit.data import DataError
from ssl_vit.train.preemption import PREEMPTED_STATUS, Preempted
from ssl_vit.train.state import RunError
from ssl_vit.weights import CheckpointError

USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError)
"""What the user's input can be at fault for: reported as a message, not a traceback."""
RUN_FAILURES = (RunError, torch.OutOfMemoryError, MemoryError)
"""Why a run stops that is not its input's fault: reported as a message too."""


def message(e: BaseException) -> str:
    """The message of `e` alone: without the traceback a DataLoader worker wraps around it, and
    for an out-of-memory stop with what to do."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:  # raised in a loader worker
        text = text.rpartition(f"{type(e).__module__}.{type(e).__qualname__}: ")[2]
    if isinstance(e, torch.OutOfMemoryError | MemoryError) or "can't allocate memory" in text:
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        text = (
            f"out of memory ({first[:300]}): lower --train.batch_size (--train.effective_batch "
            "keeps the effective batch through accumulation), pass --model.grad_checkpointing "
            "true, or use a smaller model; then resume with --train.resume auto"
        )
    return text


def report(e: BaseException, kind: str = "error") -> None:
    """Print `e` once per launch (rank 0), and leave it where torchrun's error summary shows it
    (its TORCHELASTIC_ERROR_FILE) instead of a pointer to enable tracebacks."""
    text = f"{kind}: {message(e)}"
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr, flush=True)
    if error_file := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with open(error_file, "w") as f:
            json.dump({"message": text, "timestamp": int(time.time())}, f)
    if os.environ.get("RANK", "0") != "0":
        time.sleep(2)  # torchrun stops every process once one exits: let rank 0 print first


class Args:
    """What the command line said besides the overrides: the shaping flags' values and the keys
    it set (so that defaults filled later from a checkpoint never replace them)."""

    def __init__(self, flags: dict[str, str], given: set[str], print_config: bool = False):
        self.flags, self.given, self.print_config = flags, given, print_config

    def __getitem__(self, flag: str) -> str:
        return self.flags[flag]


def parse(
    make_root: Callable[[Args], Any], argv: Sequence[str], flags: dict[str, str] | None = None
) -> tuple[Any, Args, bool]:
    """(root, args, whether --help was asked): `flags` (flag -> default) are taken out of argv
    first and may shape the config tree, root = make_root(args); then the values of a --config
    file (which also gives --method and --protocol when the command line does not), then the rest
    of argv, `--section.field` overrides; neither applied when --help was asked."""
    rest, values = list(argv), {}
    config_file, rest = pop_flag(rest, "--config")
    print_config = "--print-config" in rest
    rest = [a for a in rest if a != "--print-config"]
    from_file = read_config(config_file) if config_file else {}
    for flag, default in (flags or {}).items():
        values[flag], rest = pop_flag(rest, flag, "\0")
        if values[flag] == "\0":
            values[flag] = str(from_file.get(FILE_FLAGS.get(flag, ""), default))
    overrides, want_help = parse_args(rest)
    args = Args(values, set(from_file) | set(overrides), print_config)
    root = make_root(args)
    if not want_help:
        name = from_file.pop("method.name", None)
        if name is not None and isinstance(root, Config) and name != root.method.name:
            raise ConfigError(
                [f"--config: {config_file} is a {name} config, not {root.method.name}"]
            )
        try:
            apply_overrides(root, from_file)
        except ConfigError as e:
            raise ConfigError(
                [f"--config {config_file}: {m.lstrip('-')}" for m in e.errors]
            ) from None
        apply_overrides(root, overrides)
    return root, args, want_help


CONFIG_HELP = """

config files:
  --config FILE  start from FILE (JSON or YAML, as --print-config writes it); the options on the
      command line override its values
  --print-config  print the resolved config as JSON (reusable as --config FILE) and exit"""
"""Every command's and recipe's --help ends with the two flags the runner itself takes."""

FILE_FLAGS = {"--method": "method.name", "--protocol": "method.protocol"}
"""The shaping flags a config file gives by its values, when the command line does not."""


def as_dict(root: Any) -> dict[str, Any]:
    """The command's config tree as --print-config shows it (and --config reads it back)."""
    return root.to_dict() if isinstance(root, Config) else dataclasses.asdict(root)


def run_command(
    make_root: Callable[[Args], Any],
    argv: Sequence[str],
    prog: str,
    action: Callable[[Any, Args], dict[str, Any] | None],
    *,
    flags: dict[str, str] | None = None,
    help_extra: str = "",
) -> int:
    """Run one command: `parse` the command line, print --help or call action(root, args) -> the
    result to print as one JSON line (None prints nothing)."""
    try:
        root, args, want_help = parse(make_root, argv, flags)
        if want_help:
            print(help_text(root, prog) + CONFIG_HELP + help_extra)
            return 0
        if args.print_config:
            print(json.dumps(as_dict(root), indent=2))
            return 0
        result = action(root, args)
    except USER_ERRORS as e:
        report(e)
        return 2
    except Preempted as e:  # a signal: saved, to be resumed
        report(e, "stopped")
        return PREEMPTED_STATUS
    except (*RUN_FAILURES, RuntimeError) as e:
        if not isinstance(e, RUN_FAILURES) and "can't allocate memory" not in str(e):
            raise  # a bug: its traceback is what helps
        report(e)
        return 1
    if result is not None and PartialState().is_main_process:  # one line per launch
        print(json.dumps(result), flush=True)
    return 0


def choice(args: Args, flag: str, known: Sequence[str], noun: str = "") -> str:
    """The value of a shaping flag, which must be one of `known` (`noun` names what it picks)."""
    value = args[flag]
    if value not in known:
        if noun:
            raise ConfigError([f"{flag}: unknown {noun} {value!r}; known: {', '.join(known)}"])
        raise ConfigError([f"{flag}: expected {' or '.join(known)}, got {value!r}"])
    return value
