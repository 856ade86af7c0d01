"""Kill soak: SIGKILL a tiny training run at random moments, many during a checkpoint save, resume
it each time with `--train.resume auto`, and compare its final weights bit for bit with an
uninterrupted run of the same config. Prints one JSON line.

    python tools/kill_soak.py --method mae --kills 15
    python tools/kill_soak.py --method dino --kills 15 --seed 1 --dir /tmp/soak
    python tools/kill_soak.py --method mae --kills 10 --processes 2            # every rank killed
    python tools/kill_soak.py --method mae --kills 10 --processes 2 --signal TERM

Each attempt is killed either while a save is being written (a `step_*.tmp` or `.deleting`
folder exists: after 0-2 of its saves, 0-40 ms into the next) or at a random moment after its
first logged step; then one last attempt runs to the end. The run uses 2 loader workers and
saves every 2 steps. With `--processes N` it runs under `accelerate launch --multi_gpu` (gloo on
CPU) and a kill takes the launcher and every rank with its loader workers at once. With
`--signal TERM` each attempt is sent SIGTERM instead (to the launcher, or to one rank chosen at
random), which must stop it with a complete checkpoint of the last step it logged and the log
line of that stop (`saved_at_stop` counts them): nothing lost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

MODEL = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2)
MODEL |= dict(num_heads=2)
METHODS = {
    "mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "dino": dict(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops=3, local_crop_size=16),
}
TRAIN = dict(epochs=10, warmup_epochs=1, batch_size=8, base_lr=0.05, log_every=1)
TRAIN |= dict(save_every_steps=2, save_every_epochs=0, keep_last=3)
DATA = dict(synthetic_size=64, num_workers=2)
"""80 steps of 8 images (8 per epoch), a checkpoint every 2 steps, 2 loader workers."""


def command(method: str, run_dir: Path, processes: int) -> list[str]:
    args = [sys.executable, "-m", "ssl_vit", "train", "--method", method]
    if processes > 1:  # --multi_gpu selects the torchrun launcher: gloo without GPUs
        args = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
        args += ["--num_processes", str(processes), "--num_machines", "1"]
        args += ["--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
        args += ["-m", "ssl_vit", "train", "--method", method]
    sections = {"model": MODEL, "method": METHODS[method], "data": DATA}
    sections["train"] = TRAIN | dict(output_dir=str(run_dir), resume="auto")
    for section, fields in sections.items():
        args += [a for k, v in fields.items() for a in (f"--{section}.{k}", str(v))]
    return args


def ranks(launcher: int) -> list[int]:
    """The pids of the processes a launcher started (its children with RANK set)."""
    found = []
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                if b"\0RANK=" in b"\0" + Path(f"/proc/{child}/environ").read_bytes():
                    found.append(int(child))
    return found


def saving(run_dir: Path, since: float) -> bool:
    """Whether a checkpoint is being written or deleted right now (by the attempt started at
    `since`: a folder a killed attempt left is removed only when the next one starts)."""
    root = run_dir / "checkpoints"
    for p in root.iterdir() if root.is_dir() else []:
        try:
            if p.suffix in (".tmp", ".deleting") and p.stat().st_mtime >= since:
                return True
        except FileNotFoundError:  # renamed or removed since it was listed
            continue
    return False


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r["step"] for r in rows if "loss" in r]


@dataclass
class Outcome:
    """How an attempt ended: stopped by us (killed), during a save, and for a SIGTERM whether
    the run saved a complete checkpoint of the last step it logged."""

    killed: bool = False
    during_save: bool = False
    saved_at_stop: bool = False


def attempt(cmd: list[str], run_dir: Path, rng: random.Random, sig: str) -> Outcome:
    """Run one attempt and stop it (SIGKILL to all its processes, or SIGTERM to the launcher or
    one rank); an Outcome with killed False if it ran to its end first."""
    since = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    at_save, skip_saves, seen_saves = rng.random() < 0.5, rng.randint(0, 2), 0
    delay, started, was_saving = rng.uniform(0.0, 4.0), None, False

    def kill() -> Outcome:
        during = saving(run_dir, since)
        if sig == "KILL":  # the launcher's group, and each rank's session (its loader workers)
            for rank in ranks(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(rank, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Outcome(True, during)
        target = rng.choice([proc.pid, *ranks(proc.pid)])
        os.kill(target, signal.SIGTERM)
        status = proc.wait()
        newest = sorted((run_dir / "checkpoints").glob("step_*[0-9]"))
        complete = bool(newest) and (newest[-1] / "complete").is_file()
        last = max(logged_steps(run_dir))
        stopped = f"the run stopped after step {last};" in (run_dir / "train.log").read_text()
        saved = complete and stopped and int(newest[-1].name[5:]) == last
        return Outcome(status != 0, during, saved)

    while proc.poll() is None:
        now_saving = saving(run_dir, since)
        if at_save and now_saving and not was_saving:
            seen_saves += 1
            if seen_saves > skip_saves:
                time.sleep(rng.uniform(0.0, 0.04))
                return kill()
        was_saving = now_saving
        metrics = run_dir / "metrics.jsonl"
        if started is None and metrics.is_file() and metrics.stat().st_mtime > since:
            started = time.time()  # this attempt logged its first step
        if not at_save and started is not None and time.time() - started > delay:
            return kill()
        time.sleep(0.002)
    if proc.returncode != 0:
        raise SystemExit(f"attempt failed with exit status {proc.returncode}: {' '.join(cmd)}")
    return Outcome()


def final_weights(run_dir: Path) -> dict:
    last = sorted((run_dir / "checkpoints").glob("step_*[0-9]"))[-1]
    return load_file(str(last / "model.safetensors")) | {
        f"export.{k}": v
        for k, v in load_file(str(run_dir / "backbone" / "model.safetensors")).items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=list(METHODS), default="mae")
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0, help="of the kill moments")
    parser.add_argument("--dir", default="", help="work folder (default: a temporary one)")
    parser.add_argument("--processes", type=int, default=1, help="> 1: under accelerate launch")
    parser.add_argument("--signal", choices=["KILL", "TERM"], default="KILL")
    parser.add_argument("--epochs", type=int, default=TRAIN["epochs"], help="of 4 or 8 steps")
    args = parser.parse_args()
    TRAIN["epochs"] = args.epochs
    work = Path(args.dir or tempfile.mkdtemp(prefix="kill_soak_"))
    straight, killed = work / f"{args.method}_straight", work / f"{args.method}_killed"
    for d in (straight, killed):
        shutil.rmtree(d, ignore_errors=True)
    rng = random.Random(args.seed)
    start = time.time()

    def run(run_dir: Path) -> None:
        cmd = command(args.method, run_dir, args.processes)
        subprocess.run(cmd, check=True, capture_output=True)

    run(straight)
    outcomes, attempts = [], 0
    while True:
        attempts += 1
        if len(outcomes) < args.kills:
            cmd = command(args.method, killed, args.processes)
            if (outcome := attempt(cmd, killed, rng, args.signal)).killed:
                outcomes.append(outcome)
                continue
        else:
            run(killed)
        break

    a, b = final_weights(straight), final_weights(killed)
    differing = sorted(k for k in a if k not in b or not torch.equal(a[k], b[k]))
    steps = logged_steps(killed)
    result = {
        "method": args.method,
        "processes": args.processes,
        "signal": args.signal,
        "kills": len(outcomes),
        "during_saves": sum(o.during_save for o in outcomes),
        "attempts": attempts,
        "steps": max(steps),
        "bit_identical": not differing and a.keys() == b.keys(),
        "tensors": len(a),
        "differing": differing[:10],
        "one_row_per_step": steps == list(range(1, max(steps) + 1)),
    }
    if args.signal == "TERM":  # each signal: a complete checkpoint of the last logged step
        result["saved_at_stop"] = sum(o.saved_at_stop for o in outcomes)
    print(json.dumps(result | {"seconds": round(time.time() - start), "dir": str(work)}))


if __name__ == "__main__":
    main()
