"""The one command runner: every `ssl-vit` subcommand and every recipe goes through `run_command`.

flags that shape the command (--checkpoint, --protocol, --method) -> the config tree's
`--section.field value` overrides -> --help, or the command's action -> its result as one JSON
line on stdout (main process only), exit status 0; bad input: one clear message on stderr,
exit status 2, no traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from accelerate import PartialState

from ssl_vit.config import ConfigError, apply_overrides, help_text, parse_args, pop_flag
from ssl_vit.data import DataError
from ssl_vit.weights import CheckpointError

USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError)
"""What the user's input can be at fault for: reported as a message, not a traceback."""


class Args:
    """What the command line said besides the overrides: the shaping flags' values and the keys
    it set (so that defaults filled later from a checkpoint never replace them)."""

    def __init__(self, flags: dict[str, str], given: set[str]):
        self.flags, self.given = flags, given

    def __getitem__(self, flag: str) -> str:
        return self.flags[flag]


def parse(
    make_root: Callable[[Args], Any], argv: Sequence[str], flags: dict[str, str] | None = None
) -> tuple[Any, Args, bool]:
    """(root, args, whether --help was asked): `flags` (flag -> default) are taken out of argv
    first and may shape the config tree, root = make_root(args); the rest of argv are
    `--section.field` overrides, applied to root unless --help was asked."""
    rest, values = list(argv), {}
    for flag, default in (flags or {}).items():
        values[flag], rest = pop_flag(rest, flag, default)
    overrides, want_help = parse_args(rest)
    args = Args(values, set(overrides))
    root = make_root(args)
    if not want_help:
        apply_overrides(root, overrides)
    return root, args, want_help


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
            print(help_text(root, prog) + help_extra)
            return 0
        result = action(root, args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
