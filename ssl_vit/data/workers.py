"""Loader workers that die: their death found reliably and said in one line.

torch reports a worker's death in the training process through its SIGCHLD handler, which raises
its error once, wherever that process is: also inside a library's `except Exception` (tqdm's
terminal probe at every progress update), which swallows it, after which the loader waits out its
whole timeout; and a worker that dies before torch has registered it is not reported at all. So
while a loader runs, the handler is wrapped (`watch_workers`) to raise the error again at every
SIGCHLD once it has been raised, the training loop sends SIGCHLD while it waits for a batch
(ssl_vit.train.run.watch), and when the run stops the handler is set aside (`stop_watching`), so
that it raises at no later line.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from typing import Any

from torch.utils.data._utils import signal_handling

WORKER_DIED = re.compile(
    r"DataLoader worker \(pid (\d+)\) (?:exited unexpectedly with exit code (-?\d+)"
    r"|is killed by signal: ([^.]+))"
)
"""The error torch raises in the main process when a loader worker died (its SIGCHLD handler, or
the loader finding the worker gone): pid, and exit code or signal description."""
WORKERS_GONE = re.compile(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly")
"""torch's summary of the same, which chains the detailed error when it has one."""
SIGNALS = {signal.strsignal(s): s.name for s in signal.Signals if signal.strsignal(s)}


def worker_death(e: BaseException | None) -> str | None:
    """How a loader worker died, read from `e` or the errors it chains, and what to try: "a
    loader worker (pid 7905) was killed by SIGKILL (Killed): out of memory? ..."; None when `e`
    is no worker's death."""
    chain = []
    while e is not None and len(chain) < 8:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    for text in chain:
        if m := WORKER_DIED.search(text):
            pid, code, described = m[1], m[2], (m[3] or "").strip()
            if code is not None:
                return f"a loader worker (pid {pid}) exited with code {code}: {WORKER_EXITED}"
            name = SIGNALS.get(described, "a signal")
            hint = {"SIGKILL": OUT_OF_MEMORY, "SIGBUS": OUT_OF_SHM}.get(name, WORKER_EXITED)
            return f"a loader worker (pid {pid}) was killed by {name} ({described}): {hint}"
    for text in chain:
        if m := WORKERS_GONE.search(text):
            return f"a loader worker (pid {m[1]}) exited unexpectedly: {WORKER_EXITED}"
    return None


OUT_OF_MEMORY = (
    "out of memory? The OOM killer sends SIGKILL (see `dmesg`): lower --data.num_workers or "
    "--train.batch_size"
)
OUT_OF_SHM = (
    "out of shared memory? Workers pass batches through /dev/shm: enlarge it (docker "
    "--shm-size) or lower --data.num_workers"
)
WORKER_EXITED = (
    "what it printed, if anything, is above; --data.num_workers 0 loads in the training process, "
    "where an error shows in full"
)


TORCH_HANDLER: list[Any] = []
"""torch's SIGCHLD handler, which it installs once per process (at its first loader with
workers): installed here first, so that it can be wrapped."""
DIED: list[BaseException] = []
"""torch's error for the worker that died, once raised."""


def watch_workers() -> None:
    """Before a loader starts its workers (in the main thread, the only one that handles
    signals): SIGCHLD handled by `keep_raising`; an earlier loader's death forgotten."""
    if threading.current_thread() is not threading.main_thread():
        return
    DIED.clear()
    if not TORCH_HANDLER:
        signal_handling._set_SIGCHLD_handler()
        TORCH_HANDLER.append(signal.getsignal(signal.SIGCHLD))
    if callable(TORCH_HANDLER[0]):
        signal.signal(signal.SIGCHLD, keep_raising)


def keep_raising(signum: int, frame: Any) -> None:
    """torch's SIGCHLD handler, raising its error again at each call once it has raised it."""
    if DIED:
        raise DIED[0]
    try:
        TORCH_HANDLER[0](signum, frame)
    except RuntimeError as e:
        DIED.append(e)
        raise


def stop_watching() -> None:
    """The run stops: SIGCHLD raises nothing more (the loader's remaining workers end later)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def check_workers(cut_off: bool) -> None:
    """The run stops on a loader error: raise torch's error for a worker that died, if one did,
    here rather than at some later line. A batch cut off by a worker's death (`cut_off`: a reset
    connection or a short read) can arrive a moment before the kernel reports the death."""
    stop_watching()
    if not (TORCH_HANDLER and callable(TORCH_HANDLER[0])):
        return
    for _ in range(20 if cut_off else 1):
        keep_raising(signal.SIGCHLD, None)
        time.sleep(0.05 if cut_off else 0)
