"""Run checkpoints that survive a crash, and resume.

A checkpoint is `checkpoints/step_XXXXXXX/`, written by Accelerate's `save_state` under a `.tmp`
name; only when every process has finished writing does the main process add the `complete` marker
(the last file written) and rename the folder into place. Resume only ever reads complete
checkpoints, and older ones are deleted only after the new one is complete, so a run killed at any
moment leaves its previous good state loadable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ssl_vit.weights import CHECKPOINTS, COMPLETE, complete_checkpoints, fsync_dir, write_atomic

log = logging.getLogger("ssl_vit")


def save_checkpoint(accelerator: Any, run_dir: str | Path, step: int, keep_last: int) -> Path:
    """Save the full training state of every process atomically; keep the newest `keep_last`.

    Called on every process (Accelerate writes per-process RNG states).
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_atomic(tmp / COMPLETE, json.dumps({"step": step}).encode())
        if final.exists():  # a resumed run saving the step it resumed from
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator: Any, checkpoint: Path, state: Any) -> None:
    """Load a complete checkpoint into everything registered with `accelerator` (model,
    optimizer, RNG, data position, `state`)."""
    accelerator.load_state(str(checkpoint))
    log.info(
        "resumed from %s at step %d (epoch %d, batch %d)",
        checkpoint,
        state.step,
        state.epoch,
        state.batch_in_epoch,
    )
