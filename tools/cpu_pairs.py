"""Our training step against the official code's on the CPU, side by side (issue 27, item 3).

    tools/official_code.sh MAE_GIT DINO_GIT DEIT_GIT official     # once; never committed
    PYTHONPATH=. python tools/cpu_pairs.py --official official [--pairs 9] [--workloads mae,dino]

For each workload, `--pairs` pairs of runs: our step (tools/bench.py's, the trainer's own step
function) and the official one (tools/gpu_suite_work.py's, their code timed by the same loop),
each in a fresh process of its own, one after the other, the pair's order alternating so that
neither side always runs first on a warmer machine. Both at fp32 on every CPU thread, on the same
synthetic batch shapes. Reported per workload: each pair's ratio ours / official of the median
step time, their median (the figure: < 1 is faster than the official), and each side's median
step time and minor page faults per step. Timings need a quiet machine: another busy process
moves both sides, but not alike.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
from pathlib import Path
from typing import Any

from gpu_suite import (
    PRELOAD,
    TINY_MODEL,
    bench_argv,
    in_processes,
    official_errors,
    refused,
)
from gpu_suite import WORKLOADS as GPU_WORKLOADS

CPU = {"bench.device": "cpu", "bench.precision": "fp32", "bench.baseline": False}
WORKLOADS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "mae": GPU_WORKLOADS["mae"],
    "dino": GPU_WORKLOADS["dino"],
    "deit": (
        {"method": "deit", "model.name": "deit_small_patch16_224", "model.drop_path": 0.1,
         "method.distillation": "hard"},
        {"method.num_classes": 10, "method.teacher": "resnet10t"},
    ),
}  # fmt: skip
"""Workload -> (its settings, what --smoke changes besides the tiny encoder): the GPU suite's MAE
ViT-B/16 (recipes/mae_vitb.py) and DINO ViT-S/16 with 2 x 224 + 10 x 96 crops and per-parameter
clipping (recipes/dino_vits16.py), at SIZES' batch; DeiT-S hard-distilled from a RegNetY-16GF."""
SIZES = {
    "full": {"bench.batch_size": 8, "bench.warmup": 1, "bench.steps": 3},
    "smoke": {"bench.batch_size": 4, "bench.warmup": 1, "bench.steps": 2, **TINY_MODEL},
}
"""Batch and steps of a run (over the workload's own batch): a DINO step of batch 8 takes ~7 s
on 2 cores."""


def settings(workload: str, smoke: bool) -> dict[str, Any]:
    full, tiny = WORKLOADS[workload]
    return {**full, **CPU, **SIZES["smoke" if smoke else "full"], **(tiny if smoke else {})}


def pair(workload: str, official: str, smoke: bool, ours_first: bool) -> dict[str, Any]:
    """One pair: our step and the official one, each in a fresh process, in the order given."""
    argv = bench_argv(settings(workload, smoke))
    calls = {
        "ours": ("our_steps", (argv, ["method"]), {}),
        "official": ("official_steps", (workload, official, argv), {}),
    }
    order = ["ours", "official"] if ours_first else ["official", "ours"]
    runs = {side: in_processes([calls[side]], 3600)[0] for side in order}
    return {
        "ratio": runs["ours"]["step_time_s"] / runs["official"]["step_time_s"],
        **{f"{side}_step_time_s": runs[side]["step_time_s"] for side in runs},
        **{f"{side}_minor_faults": runs[side]["minor_faults"] for side in runs},
        "shims": runs["official"]["shims"],
    }


def compare(workload: str, official: str, pairs: int, smoke: bool) -> dict[str, Any]:
    """`pairs` pairs of `workload`, interleaved; the median of the per-pair ratios."""
    runs = []
    for i in range(pairs):
        runs.append(pair(workload, official, smoke, ours_first=i % 2 == 0))
        r = runs[-1]
        print(
            f"cpu_pairs: {workload} pair {i + 1}/{pairs}: ours {r['ours_step_time_s']:.3f} s, "
            f"official {r['official_step_time_s']:.3f} s, ratio {r['ratio']:.3f}",
            file=sys.stderr,
            flush=True,
        )

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return {
        "workload": workload,
        "settings": settings(workload, smoke),
        "pairs": pairs,
        "ratios": [round(r["ratio"], 4) for r in runs],
        "ours_over_official": median("ratio"),
        "ours_step_time_s": median("ours_step_time_s"),
        "official_step_time_s": median("official_step_time_s"),
        "ours_minor_faults": median("ours_minor_faults"),
        "official_minor_faults": median("official_minor_faults"),
        "official_shims": runs[0]["shims"],
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/cpu_pairs.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--official", required=True, help="tools/official_code.sh's folder")
    parser.add_argument("--pairs", type=int, default=9, help="pairs per workload (default 9)")
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated (default: all)"
    )
    parser.add_argument("--out", default="", help="also write the results as JSON to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite's)")
    return parser.parse_args(argv)


def problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the command line, each naming the option at fault."""
    errors = [] if args.pairs > 0 else [f"--pairs: must be > 0, got {args.pairs}"]
    names = args.workloads.split(",")
    for name in names:
        if name not in WORKLOADS:
            errors.append(f"--workloads: unknown workload {name!r} (known: {', '.join(WORKLOADS)})")
    return errors + official_errors(args.official, [n for n in names if n in WORKLOADS])


def main(argv: list[str] | None = None) -> int:
    """Print one JSON line per workload; exit status 2 on a bad command line."""
    args = parse(argv)
    if refused(problems(args)):
        return 2
    mp.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    results = []
    for name in args.workloads.split(","):
        results.append(compare(name, args.official, args.pairs, args.smoke))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
