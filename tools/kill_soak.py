"""Kill soak: SIGKILL a tiny training run at random moments, many during a checkpoint save, resume
it each time with `--train.resume auto`, and compare its final weights bit for bit with an
uninterrupted run of the same config. Prints one JSON line.

    python tools/kill_soak.py --method mae --kills 15
    python tools/kill_soak.py --method dino --kills 15 --seed 1 --dir /tmp/soak

Each attempt is killed either while a save is being written (a `step_*.tmp` or `.deleting`
folder exists: after 0-2 of its saves, 0-40 ms into the next) or at a random moment after its
first logged step; then one last attempt runs to the end. The run uses 2 loader workers and
saves every 2 steps.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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


def command(method: str, run_dir: Path) -> list[str]:
    args = [sys.executable, "-m", "ssl_vit", "train", "--method", method]
    sections = {"model": MODEL, "method": METHODS[method], "data": DATA}
    sections["train"] = TRAIN | dict(output_dir=str(run_dir), resume="auto")
    for section, fields in sections.items():
        args += [a for k, v in fields.items() for a in (f"--{section}.{k}", str(v))]
    return args


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


def attempt(cmd: list[str], run_dir: Path, rng: random.Random) -> tuple[bool, bool]:
    """Run one attempt and SIGKILL it: (killed, during a save); (False, False) if it ended."""
    since = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    at_save, skip_saves, seen_saves = rng.random() < 0.5, rng.randint(0, 2), 0
    delay, started, was_saving = rng.uniform(0.0, 4.0), None, False

    def kill() -> tuple[bool, bool]:
        during = saving(run_dir, since)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True, during

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
    return False, False


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
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="kill_soak_"))
    straight, killed = work / f"{args.method}_straight", work / f"{args.method}_killed"
    for d in (straight, killed):
        shutil.rmtree(d, ignore_errors=True)
    rng = random.Random(args.seed)
    start = time.time()

    subprocess.run(command(args.method, straight), check=True, capture_output=True)
    kills = during_saves = attempts = 0
    while True:
        attempts += 1
        if kills < args.kills:
            was_killed, during = attempt(command(args.method, killed), killed, rng)
            kills += was_killed
            during_saves += during
            if was_killed:
                continue
        else:
            subprocess.run(command(args.method, killed), check=True, capture_output=True)
        break

    a, b = final_weights(straight), final_weights(killed)
    differing = sorted(k for k in a if k not in b or not torch.equal(a[k], b[k]))
    steps = logged_steps(killed)
    print(
        json.dumps(
            {
                "method": args.method,
                "kills": kills,
                "during_saves": during_saves,
                "attempts": attempts,
                "steps": max(steps),
                "bit_identical": not differing and a.keys() == b.keys(),
                "tensors": len(a),
                "differing": differing[:10],
                "one_row_per_step": steps == list(range(1, max(steps) + 1)),
                "seconds": round(time.time() - start),
                "dir": str(work),
            }
        )
    )


if __name__ == "__main__":
    main()
