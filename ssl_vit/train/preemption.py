"""Preemption and a vanished launcher: the run stops at a step boundary with a checkpoint.

SIGTERM (what SLURM, Kubernetes and spot instances send before they kill), SIGUSR1 (SLURM's
`--signal` warning) and SIGINT (Ctrl-C) ask the run to stop: every process votes at each optimizer
step, all stop after the same step, a complete checkpoint is saved, and the run exits with
PREEMPTED_STATUS and a line naming the checkpoint and the resume command. A second signal aborts
at once (the previous complete checkpoint stays intact); a copy of the first notice arriving
within RELAYED_WITHIN seconds (the launcher relaying what the scheduler also sent every process)
is the same notice.

Under torchrun (`accelerate launch`) each process runs in its own session, so killing the
launcher's process group leaves it running: it asks the kernel for SIGTERM when its launcher
dies, and so stops the same way instead of training on alone. A process whose peer died sees its
next collective fail (`peer_lost`): the run stops with a message, not a traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ssl_vit.data import STOP_SIGNALS
from ssl_vit.train.state import RunError

PREEMPTED_STATUS = 75
"""The exit status of a run stopped by a signal after its checkpoint (sysexits' EX_TEMPFAIL:
resume later). Under `accelerate launch` the launcher reports its own status (1)."""
RELAYED_WITHIN = 1.0
PR_SET_PDEATHSIG = 1


class Preempted(RunError):
    """The run stopped on a signal after saving a complete checkpoint; the message names it."""


class StopRequest:
    """The signal that asked this process to stop (None while none has); a handler of
    STOP_SIGNALS. `launcher` is the parent pid whose death sends SIGTERM (0: none watched)."""

    def __init__(self, launcher: int = 0):
        self.signum: int | None = None
        self.at = 0.0
        self.launcher = launcher

    def handle(self, signum: int, frame: Any = None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.at = signum, now
            say(f"{self.reason}: stopping after this step with a checkpoint; again aborts at once")
        elif now - self.at >= RELAYED_WITHIN:
            name = signal.Signals(signum).name
            say(f"{name} received again: aborting at once; the previous complete checkpoint stays")
            os._exit(128 + signum)

    @property
    def reason(self) -> str:
        """What asked the run to stop: this process's signal, else another process's."""
        if self.signum is None:
            return "another process of the run was asked to stop"
        if self.launcher and os.getppid() != self.launcher:
            return "the launcher is gone"
        return f"{signal.Signals(self.signum).name} received"


def say(text: str) -> None:
    """One line on stderr from a signal handler: a single write, never interleaved."""
    rank = os.environ.get("RANK")
    os.write(2, f"{'[rank ' + rank + '] ' if rank else ''}{text}\n".encode())


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Handle STOP_SIGNALS for the body (main thread only; elsewhere nothing is handled) and,
    under torchrun, ask for SIGTERM when the launcher dies."""
    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else 0
    request = StopRequest(launcher)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    if launcher and sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != launcher:  # died before the request took effect
            request.handle(signal.SIGTERM)
    previous = {s: signal.signal(s, request.handle) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred_stop_signals() -> Iterator[None]:
    """Hold STOP_SIGNALS back for the body; they are handled when it ends. Loader workers forked
    in it are born with them blocked until they have left this process's group
    (data.own_process_group), so that a relay to the group (torchrun signals each rank's, a
    terminal its foreground one) never kills them mid-epoch."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class StopVote:
    """Whether every process agrees to stop, voted at each optimizer step without a host sync
    on the training stream: each process's flag is all-reduced (max) over a gloo group on the
    CPU, asynchronously, and read one step later; every process reads the same vote at the same
    step, so all stop together. One process: its own flag, at once."""

    def __init__(self, request: StopRequest, processes: int):
        self.request = request
        self.group = dist.new_group(backend="gloo") if processes > 1 else None
        self.pending: tuple[Any, torch.Tensor] | None = None

    def agreed(self) -> bool:
        asked = self.request.signum is not None
        if self.group is None:
            return asked
        flag = torch.tensor([int(asked)])
        stop = False
        if self.pending is not None:
            work, voted = self.pending
            work.wait()
            stop = bool(voted.item())
        self.pending = (dist.all_reduce(flag, dist.ReduceOp.MAX, self.group, async_op=True), flag)
        return stop

    def close(self) -> None:
        """Wait for the last vote before the process group goes; a run ending on an error
        (a peer gone) reports that error, not the vote's."""
        if self.pending is not None:
            with contextlib.suppress(RuntimeError):
                self.pending[0].wait()
            self.pending = None


PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "timed out")
"""What gloo and NCCL say when another process of the run died or stopped answering."""


def peer_lost(e: BaseException, processes: int) -> bool:
    """Whether `e`, raised in a collective, means another process of the run is gone."""
    distributed = isinstance(e, dist.DistError) or any(s in str(e) for s in PEER_LOST)
    return processes > 1 and isinstance(e, RuntimeError) and distributed
