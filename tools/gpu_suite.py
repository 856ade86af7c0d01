"""Every GPU figure the project lacks, in one call (issue 27): img/s, MFU and peak memory of each
workload, ours against the official MAE, DINO and DeiT code, the data pipeline end to end, a
2-process resume. Each figure is written as JSON under --out the moment it is measured, the most
important first, so that a call cut short still returns what it measured.

    PYTHONPATH=. python tools/gpu_suite.py --out $OUT [--official official/]
    PYTHONPATH=. python tools/gpu_suite.py --smoke --out /tmp/suite     # CPU rehearsal, tiny sizes

Sections, in order: the step of MAE ViT-B/16 (batch 256), DINO ViT-S/16 2 x 224 + 10 x 96 (128)
and DeiT-B (256); the official MAE and DINO steps at the same batch and precision (--official: a
folder written by tools/official_code.sh); MAE end to end with the views decoded on the device
against its compute-only step; MAE compiled; DINOv2 ViT-S/14; DINO end to end; a 2-process
training resumed half way against the straight run (on a machine with 2 GPUs, or on the CPU);
DINO compiled; the official DeiT-B step. Every goal's figure comes before the compiled runs,
whose compilation takes minutes. A step is the trainer's own, timed by `tools/bench.py`
(`time_steps`); the official steps by the same loop.

Each section's work runs in a process of its own (tools/gpu_suite_work.py), forked from a server
that imported torch and the package once: a start costs a fork, not an import. This process
imports neither, so it never touches the GPU and starts at once. A
section whose estimate does not fit in what is left of --budget_s is skipped and recorded so; one
that runs past it is stopped. `--smoke` runs every section on the CPU at tiny sizes
(tests/test_gpu_suite.py runs it), so the suite cannot rot while no GPU is at hand. Files:
NN_<section>.json per section (status ok / skipped / failed / timed_out, the figures, the
equivalent `tools/bench.py` command), environment.json, and summary.json (every section's
status and the goals), rewritten after each section; the summary also as one JSON line on
stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORK = "gpu_suite_work"
"""The module whose functions the section processes run (tools/gpu_suite_work.py)."""
PRELOAD = (
    "torch", "torch._dynamo", "torchvision", "timm", "accelerate", "safetensors.torch",
    "ssl_vit.registry", "ssl_vit.data", "ssl_vit.train.loop", "ssl_vit.cli.runner",
)  # fmt: skip
"""What the process server imports once, so that a section's process, forked from it, starts in
a fraction of a second (the tools/ modules, not on the server's path, then import only their own
code)."""
BUDGET_S = 540.0
"""One device call may run 10 minutes: the suite starts no section past 9."""
FULL = {"bench.steps": 20, "bench.warmup": 5}
"""Timed and untimed steps of every step on a GPU (compilation falls in the warmup)."""
SMOKE = {"bench.steps": 2, "bench.warmup": 1, "bench.batch_size": 4, "bench.device": "cpu"}
TINY_MODEL = {
    "model.name": "vit_tiny_patch16_224",
    "model.img_size": 32,
    "model.patch_size": 8,
    "model.embed_dim": 32,
    "model.depth": 2,
    "model.num_heads": 2,
}
"""The smoke's encoder: 2 blocks of width 32 on 32 px images, 16 patches; a step in ms."""
TINY_HEAD = {"method.out_dim": 64, "method.hidden_dim": 32, "method.bottleneck_dim": 16}
WORKLOADS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "mae": (
        {"method": "mae", "model.name": "vit_base_patch16_224", "bench.batch_size": 256},
        {"method.decoder_dim": 32, "method.decoder_depth": 1, "method.decoder_heads": 2},
    ),
    "dino": (
        {"method": "dino", "model.name": "vit_small_patch16_224", "model.drop_path": 0.1,
         "method.local_crops": 10, "train.clip_grad": 3.0, "train.clip_mode": "param",
         "bench.batch_size": 128},
        {**TINY_HEAD, "method.local_crop_size": 16},
    ),
    "dinov2": (
        {"method": "dinov2", "model.name": "vit_small_patch14_dinov2", "model.drop_path": 0.1,
         "method.local_crops": 8, "method.local_crop_size": 98, "train.clip_grad": 3.0,
         "bench.batch_size": 128},
        {**TINY_HEAD, "method.local_crops": 2, "method.local_crop_size": 16},
    ),
    "deit_b": (
        {"method": "deit", "model.name": "deit_base_patch16_224", "model.drop_path": 0.1,
         "method.distillation": "none", "bench.batch_size": 256},
        {"method.num_classes": 10},
    ),
}  # fmt: skip
"""Workload -> (its bench settings on a GPU: what in its recipe changes the step's cost; what the
smoke changes besides TINY_MODEL). MAE: recipes/mae_vitb.py; DINO: recipes/dino_vits16.py with the
issue's 10 local crops; DINOv2: recipes/dinov2_vits14.py; DeiT-B: supervised (no teacher)."""
JPEGS = {"full": (1024, 320), "smoke": (8, 40)}
"""(images, side in px) of the generated JPEG folder the end-to-end sections read."""
OFFICIAL_FILES = {
    "mae": ("models_mae.py", "util/misc.py", "util/lr_sched.py"),
    "dino": ("vision_transformer.py", "utils.py", "main_dino.py"),
    "deit": ("models.py", "losses.py"),
}
"""What --official DIR must hold (tools/official_code.sh extracts them from the repositories)."""
RESUME_STEPS = 3
"""The 2-process round trip: a straight run of 2 x 3 steps against one resumed at step 3 (4 steps
an epoch: mid-epoch)."""
GOALS = (
    ("mae_mfu", 0.50, "MFU of MAE ViT-B/16 (best of eager and compiled)"),
    ("dino_mfu", 0.40, "MFU of DINO ViT-S/16 2 x 224 + 10 x 96 (best of eager and compiled)"),
    ("deit_b_mfu", 0.50, "MFU of DeiT-B"),
    ("mae_over_official", 3.0, "img/s of our MAE step (best) / the official MAE step's"),
    ("dino_over_official", 3.0, "img/s of our DINO step (best) / the official DINO step's"),
    ("mae_e2e_over_compute", 0.9, "MAE img/s end to end (decode on device) / compute only"),
    ("dino_e2e_over_compute", 0.9, "DINO img/s end to end (decode on device) / compute only"),
)
"""Issue 27's goals, for an H100 at bf16: (name, target, what is compared)."""


class Skip(Exception):
    """A section that cannot run here, with the reason recorded in its JSON."""


class SectionFailed(Exception):
    """A section's process raised or died; the message is recorded."""


class SectionTimeout(SectionFailed):
    """A section ran past what was left of the budget and was stopped."""


# ---------------------------------------------------------------------------------------------
# Processes: each section's work runs in a fresh process forked from the preloaded server.


Call = tuple[str, tuple, dict[str, str]]
"""(a function of tools/gpu_suite_work.py, its arguments, environment variables to set)."""


def child(conn: Any, name: str, args: tuple, env: dict[str, str]) -> None:
    """Run gpu_suite_work.<name>(*args) in this fresh process; send back (True, its result) or
    (False, the error in one line)."""
    os.environ.update(env)
    os.dup2(2, 1)  # stdout holds the suite's one JSON line only: what this process prints,
    sys.stdout = sys.stderr  # gloo's C++ connection lines (torch 2.10) included, goes to stderr
    mp.set_start_method(None, force=True)  # its loader workers start as in training (not from
    # a server of their own, which would import everything again)
    try:
        conn.send((True, getattr(importlib.import_module(WORK), name)(*args)))
    except BaseException as e:  # noqa: BLE001 - every failure is reported, none ends the suite
        frame = traceback.extract_tb(e.__traceback__)[-1:]
        where = f" ({Path(frame[0].filename).name}:{frame[0].lineno})" if frame else ""
        first = (str(e).strip().splitlines() or [""])[0][:400]
        conn.send((False, f"{type(e).__name__}: {first}{where}"))
    finally:
        conn.close()


def in_processes(calls: list[Call], timeout_s: float) -> list[Any]:
    """Run every call at the same time, each in its own process; their results in order.
    Raises SectionFailed (one raised, or died) or SectionTimeout (past `timeout_s`)."""
    ctx = mp.get_context("forkserver")
    started = []
    for name, args, env in calls:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child, args=(send, name, args, env))
        proc.start()
        send.close()
        started.append((proc, recv))
    deadline = time.monotonic() + timeout_s
    try:
        results = []
        for proc, recv in started:
            if not recv.poll(max(0.0, deadline - time.monotonic())):
                raise SectionTimeout(f"stopped after {timeout_s:.0f} s: the budget ran out")
            try:
                ok, value = recv.recv()
            except EOFError:
                proc.join(10)
                raise SectionFailed(f"the process died (exit code {proc.exitcode})") from None
            if not ok:
                raise SectionFailed(value)
            results.append(value)
        return results
    finally:
        for proc, _ in started:
            proc.join(5)  # the peer of a failed rank may wait in a collective forever
            if proc.is_alive():
                proc.kill()
                proc.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun (under `accelerate launch --multi_gpu`) gives each process."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    env |= {"LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "ROLE_RANK": str(rank)}
    return env | {"RANK": str(rank), "LOCAL_RANK": str(rank)}


def bench_argv(settings: dict[str, Any]) -> list[str]:
    """`tools/bench.py` arguments of a settings dict ({"method": "mae", "model.name": ...})."""
    argv = []
    for key, value in settings.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


# ---------------------------------------------------------------------------------------------
# Sections.


@dataclass
class Section:
    name: str
    estimate_s: float
    """Seconds on one H100, generously (compilation included): a section whose estimate does not
    fit in what is left of the budget is skipped (on a GPU; the smoke runs every one)."""
    run: Callable[[Suite], dict[str, Any]]
    """Runs in this process, its work in section processes; returns the figures (JSON)."""


def our_step(workload: str, compiled: bool = False) -> Callable[[Suite], dict[str, Any]]:
    """The trainer's step of `workload` on synthetic device tensors (compiled as
    train.compile)."""

    def run(suite: Suite) -> dict[str, Any]:
        extra = {"train.compile": True, "train.compile_backend": suite.compile_backend}
        argv = bench_argv(suite.settings(workload, **(extra if compiled else {})))
        return suite.one("our_steps", argv, ["method"])

    return run


def official_step(workload: str, family: str = "") -> Callable[[Suite], dict[str, Any]]:
    """The official code's step of `workload` at our batch and precision (their repository
    `family`, default the workload's name), and ours / theirs (our eager step, measured before
    it)."""

    def run(suite: Suite) -> dict[str, Any]:
        if suite.official is None:
            raise Skip("no --official folder given (tools/official_code.sh writes one)")
        argv = bench_argv(suite.settings(workload))
        m = suite.one("official_steps", family or workload, str(suite.official), argv)
        ours = suite.results.get(workload, {}).get("img_per_s")
        return m | {
            "command": None,
            "ours_img_per_s": ours,
            "ours_over_official": ours / m["img_per_s"] if ours else None,
        }

    return run


def end_to_end(workload: str) -> Callable[[Suite], dict[str, Any]]:
    """The step fed by the trainer's loader over a generated JPEG folder, decoded and augmented
    on the device (data.decode_on_device), against the compute-only step of the same settings."""

    def run(suite: Suite) -> dict[str, Any]:
        n, size = JPEGS["smoke" if suite.smoke else "full"]
        if suite.jpegs is None:
            folder = str(suite.work / "jpegs")
            suite.jpegs = suite.one("write_jpegs", folder, n, size)
        data = {"data.path": suite.jpegs, "data.decode_on_device": True}
        data |= {"data.num_workers": suite.workers, "bench.modes": "compute,e2e"}
        argv = bench_argv(suite.settings(workload, **data))
        m = suite.one("our_steps", argv, ["method", "e2e"])
        fraction = m["e2e_img_per_s"] / m["img_per_s"]
        return m | {"e2e_img_per_s_over_compute": fraction, "jpegs": n, "jpeg_size": size}

    return run


def resume_round_trip(suite: Suite) -> dict[str, Any]:
    """A straight 2-process run of 2n steps against one resumed from its step-n checkpoint into
    another run directory, each rank a process as torchrun starts them (NCCL on 2 GPUs, gloo on
    the CPU): the parameters and the losses after step n compared bit for bit."""
    gpus = suite.env.get("gpus", 0)
    if not suite.smoke and gpus < 2:
        raise Skip(f"needs 2 GPUs; this machine has {gpus}")
    n, world, root = RESUME_STEPS, 2, suite.work / "resume"
    straight, resumed = root / "straight", root / "resumed"
    checkpoint = straight / "checkpoints" / f"step_{n:07d}"
    for run_dir, train in ((straight, {}), (resumed, {"resume": str(checkpoint)})):
        port, args = free_port(), (str(run_dir), suite.smoke, n, {"max_steps": 2 * n, **train})
        suite.processes([("train_rank", args, rank_env(r, world, port)) for r in range(world)])
    backend = "gloo" if suite.smoke or not suite.env.get("cuda_available") else "nccl"
    figures = suite.one("compare_runs", str(straight), str(resumed), n, suite.smoke)
    return {"processes": world, "backend": backend, **figures}


SECTIONS = (
    Section("mae", 40, our_step("mae")),
    Section("dino", 40, our_step("dino")),
    Section("deit_b", 40, our_step("deit_b")),
    Section("official_mae", 40, official_step("mae")),
    Section("official_dino", 50, official_step("dino")),
    Section("e2e_mae", 70, end_to_end("mae")),
    Section("mae_compiled", 150, our_step("mae", compiled=True)),
    Section("dinov2", 40, our_step("dinov2")),
    Section("e2e_dino", 60, end_to_end("dino")),
    Section("resume_2proc", 90, resume_round_trip),
    Section("dino_compiled", 150, our_step("dino", compiled=True)),
    Section("official_deit", 40, official_step("deit_b", "deit")),
)
"""In the order they run: every goal's figure first (MFU, ours / official, end to end), then the
compiled steps (minutes of compilation), DINOv2, the resume round trip; last the official DeiT
step (no goal: the CPU comparison's third workload)."""


def goal_values(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Each goal's figure from the sections measured so far (None where one is missing)."""

    def best(names: list[str], key: str) -> float | None:
        values = [results[n][key] for n in names if results.get(n, {}).get(key) is not None]
        return max(values, default=None)

    def over(ours: list[str], official: str) -> float | None:
        a, b = best(ours, "img_per_s"), best([official], "img_per_s")
        return a / b if a and b else None

    fraction = "e2e_img_per_s_over_compute"
    return {
        "mae_mfu": best(["mae", "mae_compiled"], "mfu"),
        "dino_mfu": best(["dino", "dino_compiled"], "mfu"),
        "deit_b_mfu": best(["deit_b"], "mfu"),
        "mae_over_official": over(["mae", "mae_compiled"], "official_mae"),
        "dino_over_official": over(["dino", "dino_compiled"], "official_dino"),
        "mae_e2e_over_compute": best(["e2e_mae"], fraction),
        "dino_e2e_over_compute": best(["e2e_dino"], fraction),
    }


def write_json(path: Path, value: Any) -> None:
    """Whole or not at all: a call stopped mid-write leaves the previous file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


class Suite:
    """The run: its settings, the clock, the figures so far and the files under --out."""

    def __init__(self, args: argparse.Namespace):
        self.out, self.smoke, self.budget = Path(args.out), args.smoke, args.budget_s
        self.official = Path(args.official) if args.official else None
        self.peak_tflops, self.workers = args.peak_tflops, args.num_workers
        self.compile_backend = args.compile_backend
        self.start = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self.results: dict[str, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []
        self.env: dict[str, Any] = {}
        self.jpegs: str | None = None
        """The generated JPEG folder of the end-to-end sections, once written."""
        self.out.mkdir(parents=True, exist_ok=True)

    def settings(self, workload: str, **extra: Any) -> dict[str, Any]:
        """The bench settings of `workload`: the GPU sizes, or the smoke's tiny ones."""
        full, tiny = WORKLOADS[workload]
        s = {**full, **FULL}
        if self.smoke:
            s |= {**TINY_MODEL, **tiny, **SMOKE}
        if self.peak_tflops:
            s["bench.peak_tflops"] = self.peak_tflops
        return s | extra

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def processes(self, calls: list[Call]) -> list[Any]:
        """Run `calls` at once, each in its own process, within what is left of the budget (the
        smoke's see no GPU: a rehearsal of the CPU's)."""
        hide = {"CUDA_VISIBLE_DEVICES": ""} if self.smoke else {}
        calls = [(name, args, env | hide) for name, args, env in calls]
        return in_processes(calls, self.budget - self.elapsed())

    def one(self, name: str, *args: Any) -> Any:
        """gpu_suite_work.<name>(*args) in a process of its own."""
        return self.processes([(name, args, {})])[0]

    def run(self, index: int, section: Section) -> None:
        """Run `section` unless it cannot fit; write its JSON and the summary."""
        started, record = self.elapsed(), {"section": section.name}
        estimate = 0.0 if self.smoke else section.estimate_s
        try:
            if started + estimate > self.budget:
                raise Skip(
                    f"would not fit: {started:.0f} s elapsed + an estimated {estimate:.0f} s > "
                    f"the {self.budget:.0f} s budget"
                )
            print(f"gpu_suite: {section.name} ...", file=sys.stderr, flush=True)
            figures = section.run(self)
            record |= {"status": "ok", **figures}
            self.results[section.name] = figures
        except Skip as e:
            record |= {"status": "skipped", "reason": str(e)}
        except SectionTimeout as e:
            record |= {"status": "timed_out", "reason": str(e)}
        except SectionFailed as e:
            record |= {"status": "failed", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - a section's bug here must not cost the others
            record |= {"status": "failed", "reason": f"{type(e).__name__}: {e} (gpu_suite.py)"}
        record["wall_s"] = round(self.elapsed() - started, 2)
        name = f"{index:02d}_{section.name}.json"
        write_json(self.out / name, record)
        row = {"section": section.name, "status": record["status"], "file": name}
        row |= {k: record.get(k) for k in ("img_per_s", "mfu", "peak_mem_mib", "reason")}
        self.rows.append(row)
        print(f"gpu_suite: {line(record)}", file=sys.stderr, flush=True)
        write_json(self.out / "summary.json", self.summary())

    def summary(self) -> dict[str, Any]:
        values = goal_values(self.results)
        goals = []
        for name, target, what in GOALS:
            v = values[name]
            met = None if v is None or self.smoke else v >= target
            goals.append({"goal": name, "target": target, "value": v, "met": met, "what": what})
        return {
            "smoke": self.smoke,
            "device_name": self.env.get("device_name"),
            "elapsed_s": round(self.elapsed(), 1),
            "budget_s": self.budget,
            "sections": self.rows,
            "goals": goals,
            "goals_are_for": "one H100 at bf16 (met is null in the smoke)",
        }


def line(record: dict[str, Any]) -> str:
    """One section's outcome for the log."""
    text = f"{record['section']}: {record['status']} in {record['wall_s']:.1f} s"
    if record["status"] != "ok":
        return f"{text} ({record['reason']})"
    parts = []
    if record.get("img_per_s") is not None:
        parts.append(f"{record['img_per_s']:.1f} img/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {record['mfu']:.1%}")
    if record.get("peak_mem_mib") is not None:
        parts.append(f"peak {record['peak_mem_mib']:.0f} MiB")
    for key in ("ours_over_official", "e2e_img_per_s_over_compute"):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:.3f}")
    if "params_equal" in record:
        equal = record["params_equal"], record["losses_equal"]
        parts.append("parameters equal {}, losses equal {}".format(*equal))
    return f"{text}: " + ", ".join(parts)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/gpu_suite.py", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add(
        "--out",
        default=os.environ.get("OUT", "gpu_suite_out"),
        help="folder of the JSON files (default: $OUT, else gpu_suite_out)",
    )
    add(
        "--smoke",
        action="store_true",
        help="every section on the CPU at tiny sizes (the test suite runs it)",
    )
    add(
        "--official",
        default="",
        help="folder of the official code (tools/official_code.sh writes it)",
    )
    add(
        "--budget_s",
        type=float,
        default=BUDGET_S,
        help=f"start no section past this many seconds (default {BUDGET_S:.0f})",
    )
    add(
        "--sections",
        default="",
        help="comma-separated sections to run (default all): "
        + ", ".join(s.name for s in SECTIONS),
    )
    add(
        "--peak_tflops",
        type=float,
        default=0.0,
        help="device peak for MFU (default: the GPU's from ssl_vit/flops.py)",
    )
    add(
        "--num_workers",
        type=int,
        default=-1,
        help="loader workers end to end (default: CPUs - 2; smoke 1)",
    )
    add(
        "--compile_backend",
        default="",
        help="torch.compile backend (default inductor; smoke eager)",
    )
    args = parser.parse_args(argv)
    if args.num_workers < 0:
        args.num_workers = 1 if args.smoke else max(1, (os.cpu_count() or 4) - 2)
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    return args


def official_errors(folder: str, families: list[str]) -> list[str]:
    """The first file of each family's OFFICIAL_FILES missing from `folder` (--official)."""
    errors = []
    for name in families:
        missing = [f for f in OFFICIAL_FILES[name] if not (Path(folder) / name / f).is_file()]
        if missing:
            path = Path(folder) / name / missing[0]
            errors.append(f"--official {folder}: {path} not found "
                          "(tools/official_code.sh writes it)")  # fmt: skip
    return errors


def refused(errors: list[str]) -> bool:
    """Print each error of the command line on stderr; whether there was any."""
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return bool(errors)


def problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the command line, each naming the option at fault."""
    errors = official_errors(args.official, list(OFFICIAL_FILES)) if args.official else []
    known = [s.name for s in SECTIONS]
    for name in filter(None, args.sections.split(",")):
        if name not in known:
            errors.append(f"--sections: unknown section {name!r} (known: {', '.join(known)})")
    if args.budget_s <= 0:
        errors.append(f"--budget_s: must be > 0, got {args.budget_s}")
    return errors


def main(argv: list[str] | None = None) -> int:
    """Run the suite; its summary as one JSON line on stdout. Exit status 0 (whatever the
    sections' outcome: each is in its file), 2 on a bad command line or no GPU (without
    --smoke), 1 if no process could start."""
    args = parse(argv)
    if refused(problems(args)):
        return 2
    mp.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    suite = Suite(args)
    wanted = set(filter(None, args.sections.split(","))) or {s.name for s in SECTIONS}
    try:
        try:
            suite.env = suite.one("environment")
        except SectionFailed as e:
            print(f"error: the suite's first process failed: {e}", file=sys.stderr)
            return 1
        write_json(suite.out / "environment.json", suite.env | {"argv": sys.argv[1:]})
        if not args.smoke and not suite.env["cuda_available"]:
            print(
                "error: no CUDA device: the suite's sizes are for a GPU (--smoke rehearses it on "
                "the CPU at tiny sizes)",
                file=sys.stderr,
            )
            return 2
        for index, section in enumerate(SECTIONS, 1):
            if section.name in wanted:
                suite.run(index, section)
    finally:
        shutil.rmtree(suite.work, ignore_errors=True)
    summary = suite.summary()
    write_json(suite.out / "summary.json", summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
