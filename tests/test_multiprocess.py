"""The guarantees users rely on when they train on several processes, tested where they are used:
under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU). A run stopped and resumed
through the trainer ends bit for bit where the uninterrupted run ends (MAE, DINO and DINOv3 with
mixed crop sizes; an image folder and a shard stream; with and without loader workers; DDP and
FSDP's sharded checkpoint)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import make_shards
import pytest
import torch
from conftest import ROOT, TINY_MODEL, metrics, overrides, params, tiny
from safetensors.torch import load_file
from write_images import write_image_folder

from ssl_vit.backbone import Backbone
from ssl_vit.train.preemption import PREEMPTED_STATUS, StopRequest
from ssl_vit.weights import export_backbone

STOP, STEPS = 5, 12
"""Runs of 3 epochs of 4 steps (32 images, 4 per process), stopped after step 5: mid-epoch."""


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launcher(fsdp: bool = False) -> list[str]:
    """`accelerate launch` of 2 processes on any free port."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if fsdp:  # FSDP2 over gloo: see launched_runs.fsdp_on_cpu
        cmd += ["--config_file", str(ROOT / "configs" / "fsdp.yaml")]
    else:  # --multi_gpu selects the torchrun launcher; without GPUs the processes use gloo
        cmd += ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    return cmd + ["--num_processes", "2", "--main_process_port", "0", "--mixed_precision", "no"]


def launch(tmp_path: Path, runs: list[list[str]], fsdp: bool = False) -> str:
    """Run `runs` (`ssl-vit train` argument lists) one after the other in one 2-process launch;
    its stderr."""
    spec = tmp_path / f"runs_{len(list(tmp_path.glob('runs_*')))}.json"
    spec.write_text(json.dumps(runs))
    cmd = [*launcher(fsdp), str(ROOT / "tests" / "launched_runs.py"), str(spec)]
    out = subprocess.run(
        [*cmd, *(["--fsdp"] if fsdp else [])], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """32 JPEGs of 32 px in 4 class folders, and the same as 8 WebDataset shards of 4."""
    root = tmp_path_factory.mktemp("mp_data")
    for c in range(4):
        write_image_folder(root / "folder" / f"class_{c}", 8, 32)
    make_shards.main([str(root / "folder"), str(root / "shards"), "--max_count", "4"])
    return {"folder": root / "folder", "stream": root / "shards"}


MIXED = dict(
    mixed_sizes=(32, 48), mixed_local_sizes=(16, 24), mixed_teacher_sizes=(48, 64),
    mixed_ratios=(0.5, 0.5),
)  # fmt: skip
"""dinov3_mixed: DINOv3 (a DINOv3 backbone, Gram anchoring) whose steps draw global / local /
Gram-teacher crops of 32 / 16 / 48 or 48 / 24 / 64 px, one choice a step for every process."""


def args(run: Path, method: str, source: Path, stream: bool, workers: int, **train) -> list[str]:
    mixed = method == "dinov3_mixed"
    model = {"name": "vit_small_patch16_dinov3", "num_heads": 2} if mixed else None
    method = "dinov3" if mixed else method
    cfg = tiny(run, method, model=model, **dict(batch_size=4, epochs=3) | train)
    for key, value in (MIXED if mixed else {}).items():
        setattr(cfg.method, key, value)
    cfg.data.path, cfg.data.streaming, cfg.data.num_workers = str(source), stream, workers
    if stream:
        cfg.data.shuffle_buffer = 6
    return overrides(cfg)


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors that are not bit-identical (or not in both)."""
    both = a.keys() & b.keys()
    return sorted((a.keys() ^ b.keys()) | {k for k in both if not a[k].equal(b[k])})


def final_state(run: Path) -> dict[str, torch.Tensor]:
    """The model and optimizer state of a DDP run's last checkpoint, flattened."""
    ckpt = run / "checkpoints" / f"step_{STEPS:07d}"
    state = {f"model.{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    for i, s in opt["state"].items():
        state |= {f"optimizer.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)}
    return state


CASES = {  # name: (method, data source, stream, loader workers)
    "mae_folder": ("mae", "folder", False, 0),
    "mae_stream_workers": ("mae", "stream", True, 2),
    "dino_folder_workers": ("dino", "folder", False, 2),
    "dino_stream": ("dino", "stream", True, 0),
    "dinov3_mixed_folder_workers": ("dinov3_mixed", "folder", False, 2),
}


def test_two_process_runs_resume_bit_identically(tmp_path, data):
    """Each case run straight and stopped cleanly after step 5 in one launch, then resumed with
    --train.resume auto in a second: its final model and optimizer state equal the straight
    run's bit for bit, and so do the losses it logged after the resume."""
    first, second = [], []
    for name, (method, source, stream, workers) in CASES.items():
        case = (method, data[source], stream, workers)
        first += [args(tmp_path / "straight" / name, *case)]
        first += [args(tmp_path / "resumed" / name, *case, max_steps=STOP)]
        second += [args(tmp_path / "resumed" / name, *case, resume="auto")]
    launch(tmp_path, first)
    err = launch(tmp_path, second)
    assert err.count(f"at step {STOP} (epoch 1, batch 1)") == len(CASES)  # resumed mid-epoch
    differ = {}
    for name in CASES:
        straight, resumed = tmp_path / "straight" / name, tmp_path / "resumed" / name
        a, b = metrics(straight), metrics(resumed)
        assert [r["step"] for r in b] == list(range(1, STEPS + 1)), name
        losses = sum(x["loss"] != y["loss"] for x, y in zip(a, b, strict=True))
        differ[name] = (len(differing(final_state(straight), final_state(resumed))), losses)
    assert differ == dict.fromkeys(CASES, (0, 0))  # (tensors, logged losses) that differ


def test_a_two_process_segmentation_fine_tune_resumes_bit_identically(tmp_path):
    """`ssl-vit segfinetune` (EoMT: matching image by image, the mask-loss normaliser summed over
    both processes, the mask annealing under way across the stop) on synthetic segmentation: 6
    steps straight against 3, then --train.resume auto to 6 in a second launch: the same
    parameters and logged losses, bit for bit."""
    torch.manual_seed(0)
    export_backbone(Backbone(**TINY_MODEL), tmp_path / "backbone")

    def run(name: str, **train) -> list[str]:
        schedule = dict(batch_size=4, epochs=2, warmup_epochs=0, save_every_steps=3, keep_last=9)
        cfg = tiny(tmp_path / name, "segfinetune", **schedule | train)
        cfg.method.checkpoint = str(tmp_path / "backbone")
        return ["segfinetune", *overrides(cfg)[2:]]  # the command, not --method segfinetune

    launch(tmp_path, [run("straight", max_steps=6), run("stopped", max_steps=3)])
    launch(tmp_path, [run("stopped", max_steps=6, resume="auto")])
    a, b = params(tmp_path / "straight", 6), params(tmp_path / "stopped", 6)
    assert "head.mask_prob" in a and 0 < a["head.mask_prob"].item() < 1  # annealing under way
    assert differing(a, b) == []
    straight = [m["loss"] for m in metrics(tmp_path / "straight")]
    resumed = {m["step"]: m["loss"] for m in metrics(tmp_path / "stopped")}
    assert len(straight) == 6 and [resumed[s] for s in (4, 5, 6)] == straight[3:]


def test_fsdp_sharded_checkpoint_resumes_bit_identically(tmp_path, data):
    """FSDP2: each process saves and reloads its own shard of the model and optimizer; the
    resumed run's exported backbone and losses equal the straight run's bit for bit."""
    run = lambda kind, **kw: args(tmp_path / kind, "mae", data["folder"], False, 0, **kw)  # noqa: E731
    launch(tmp_path, [run("straight"), run("resumed", max_steps=STOP)], fsdp=True)
    ckpt = tmp_path / "resumed" / "checkpoints" / f"step_{STOP:07d}"
    assert len(list((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2  # a shard each
    launch(tmp_path, [run("resumed", resume="auto")], fsdp=True)
    a = load_file(str(tmp_path / "straight" / "backbone" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "backbone" / "model.safetensors"))
    assert differing(a, b) == []
    assert [r["loss"] for r in metrics(tmp_path / "resumed")] == [
        r["loss"] for r in metrics(tmp_path / "straight")
    ]


# --- preemption: a signal stops every process at one step, after a complete checkpoint ---------

LONG = 400
"""Steps of a run that a signal stops long before its end."""


def start(run: Path, source: Path, log: Path) -> subprocess.Popen:
    """A 2-process `ssl-vit train` of LONG steps (MAE, 2 loader workers) in a session of its own,
    so that its process group can be killed; stdout and stderr to `log`."""
    cfg = args(run, "mae", source, False, 2, max_steps=LONG, epochs=LONG)
    cmd = [*launcher(), "-m", "ssl_vit", "train", *cfg]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=out, env=ENV, start_new_session=True)


def ranks(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes a launcher started (its children with RANK set)."""
    found = {}
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            rank = [v for v in env if v.startswith(b"RANK=")]
            if rank:
                found[int(rank[0][5:])] = int(child)
    return found


def wait_for_step(run: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        rows = metrics(run) if (run / "metrics.jsonl").is_file() else []
        if rows and rows[-1]["step"] >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run} did not reach step {step}")


def stopped_step(run: Path) -> int:
    """The step the run stopped after, as the log of each rank says it (the same for both)."""
    text = (run / "train.log").read_text()
    steps = {int(m[1]): int(m[2]) for m in re.finditer(r"\[rank (\d)\].*after step (\d+);", text)}
    assert sorted(steps) == [0, 1] and steps[0] == steps[1], text[-2000:]
    return steps[0]


def test_sigterm_to_one_rank_stops_both_at_one_step_with_a_checkpoint_and_resumes_exactly(
    tmp_path, data
):
    """SIGTERM to rank 1 alone (as a scheduler may signal any process): both processes vote to
    stop after the same step, save it complete and exit with the preemption status; every rank's
    line is in train.log; resumed, the run ends bit for bit where an uninterrupted one ends."""
    run, log = tmp_path / "resumed" / "run", tmp_path / "launch.log"
    proc = start(run, data["folder"], log)
    wait_for_step(run, 3, proc)
    os.kill(ranks(proc.pid)[1], signal.SIGTERM)
    assert proc.wait(timeout=120) != 0  # a rank ended with 75: the launcher reports a failure
    step = stopped_step(run)
    assert 3 < step < LONG
    ckpt = run / "checkpoints" / f"step_{step:07d}"
    assert (ckpt / "complete").is_file() and not list(run.glob("checkpoints/*.tmp"))
    assert (run / "run.lock").read_text() == ""  # released
    printed = log.read_text()
    assert f"stopped: SIGTERM received: the run stopped after step {step}; the complete " in printed
    assert f"checkpoint {ckpt} holds it: resume with the same command" in printed
    same = ("mae", data["folder"], False, 2)
    straight = args(tmp_path / "straight", *same, max_steps=step + 4, epochs=LONG)
    launch(tmp_path, [straight, args(run, *same, max_steps=step + 4, epochs=LONG, resume="auto")])
    end = f"step_{step + 4:07d}"
    a = load_file(str(tmp_path / "straight" / "checkpoints" / end / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / end / "model.safetensors"))
    assert differing(a, b) == []


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: its children, theirs, and so on."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(c) for c in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


def workers_of(pid: int, n: int = 2) -> list[int]:
    """The `n` loader workers of training process `pid`, its children (forked, nothing else),
    once it has them all: not between two epochs' workers."""
    deadline = time.time() + 30
    while time.time() < deadline:
        tasks = Path(f"/proc/{pid}/task").glob("*")
        kids = [int(c) for t in tasks for c in (t / "children").read_text().split()]
        if len(kids) == n:
            return kids
        time.sleep(0.02)
    raise AssertionError(f"process {pid} has not {n} loader workers")


def test_sigterm_to_every_process_of_the_job_stops_every_rank_saved(tmp_path, data):
    """SIGTERM to the launcher, which torchrun relays to each rank's whole process group, and to
    every process of the job at once, loader workers included, as SLURM's scancel and preemption
    send it: the workers take it from their training process alone (before: a worker died of it
    and the rank stopped on `a loader worker ... was killed by SIGTERM`, unsaved) and the ranks
    stop after one step, saved."""
    run = tmp_path / "run"
    proc = start(run, data["folder"], tmp_path / "launch.log")
    wait_for_step(run, 3, proc)
    time.sleep(0.5)  # mid-epoch, the workers busy
    workers = [w for rank in ranks(proc.pid).values() for w in workers_of(rank)]
    for pid in {proc.pid, *descendants(proc.pid), *workers}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    step = stopped_step(run)
    assert (run / "checkpoints" / f"step_{step:07d}" / "complete").is_file()
    assert " ERROR " not in (run / "train.log").read_text()


def test_sigterm_to_a_training_process_and_its_workers_stops_it_saved(tmp_path, data):
    """One process, SIGTERM to it and its loader workers (scancel): it stops after the step with a
    complete checkpoint and exits with the preemption status; resumed, it ends bit for bit where
    an uninterrupted run ends."""
    same = ("mae", data["folder"], False, 2)
    run, log = tmp_path / "run", tmp_path / "train.out"
    cmd = [sys.executable, "-m", "ssl_vit", "train", *args(run, *same, max_steps=LONG, epochs=LONG)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=ENV)
    wait_for_step(run, 3, proc)
    time.sleep(0.5)
    for pid in [proc.pid, *workers_of(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED_STATUS, log.read_text()[-3000:]
    step = int(re.search(r"the run stopped after step (\d+);", log.read_text())[1])
    assert 3 <= step < LONG and metrics(run)[-1]["step"] == step
    assert (run / "checkpoints" / f"step_{step:07d}" / "complete").is_file()
    end = dict(max_steps=step + 3, epochs=LONG)
    straight = [*args(tmp_path / "straight", *same, **end)]
    resumed = [*args(run, *same, **end, resume="auto")]
    for argv in (straight, resumed):
        out = subprocess.run(
            [sys.executable, "-m", "ssl_vit", "train", *argv],
            env=ENV,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    last = f"step_{step + 3:07d}"
    a = load_file(str(tmp_path / "straight" / "checkpoints" / last / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / last / "model.safetensors"))
    assert differing(a, b) == []


def test_killing_the_launchers_process_group_stops_the_ranks(tmp_path, data):
    """torchrun starts each rank in a session of its own, beyond the launcher's process group:
    when the launcher dies the ranks get SIGTERM from the kernel and stop at once, saved, instead
    of training on."""
    run = tmp_path / "run"
    proc = start(run, data["folder"], tmp_path / "launch.log")
    wait_for_step(run, 3, proc)
    pids = ranks(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids.values()):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in pids.values()), "ranks still running"
    step = stopped_step(run)
    assert "the launcher is gone: the run stopped after step" in (run / "train.log").read_text()
    assert metrics(run)[-1]["step"] == step < LONG  # nothing trained after the stop
    assert (run / "checkpoints" / f"step_{step:07d}" / "complete").is_file()


def test_a_second_signal_aborts_at_once_and_a_relayed_copy_does_not(monkeypatch, capfd):
    """The first signal asks for a stop; the same notice relayed within RELAYED_WITHIN seconds
    (launcher and scheduler both) is that notice; a later one aborts with 128 + the signal."""
    clock = iter([100.0, 100.5, 101.5])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    request = StopRequest()
    request.handle(signal.SIGUSR1)
    assert request.signum == signal.SIGUSR1 and request.reason == "SIGUSR1 received"
    request.handle(signal.SIGTERM)  # 0.5 s later: the same notice
    assert exits == []
    request.handle(signal.SIGTERM)  # 1.5 s after the first
    assert exits == [128 + signal.SIGTERM]
    err = capfd.readouterr().err.splitlines()
    assert err[0] == (
        "SIGUSR1 received: stopping after this step with a checkpoint; again aborts at once"
    )
    assert err[-1].startswith("SIGTERM received again: aborting at once")


def test_a_killed_rank_stops_the_other_with_one_message(tmp_path, data):
    """Rank 1 killed: rank 0's next collective fails; it stops with one line naming the newest
    checkpoint, not gloo's traceback."""
    run, log = tmp_path / "run", tmp_path / "launch.log"
    proc = start(run, data["folder"], log)
    wait_for_step(run, 3, proc)
    os.kill(ranks(proc.pid)[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    printed = log.read_text()
    assert "error: another process of the run is gone or not answering (" in printed, printed
    assert "[rank0]: Traceback" not in printed
    logged = (run / "train.log").read_text()
    assert "[rank 0] RunError: another process of the run is gone or not answering" in logged


def test_slurm_script_relays_the_warning_signal_and_requeues(tmp_path):
    """tools/slurm_train.sbatch with srun, scontrol and accelerate stood in for: SLURM's warning
    (SIGUSR1 to the script) reaches the launcher as SIGTERM, and the job is requeued."""
    bin_, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_.mkdir()
    stand_ins = {  # srun runs its command here; the launcher records what reaches it
        "srun": 'while [[ $1 == --* ]]; do shift; done; exec "$@"',
        "scontrol": '[ "$1" = show ] && echo node0 || echo "scontrol $*" >> "$LOG"',
        "accelerate": 'trap \'echo "TERM $*" >> "$LOG"; exit 75\' TERM; echo started >> "$LOG"; '
        "while true; do sleep 0.05; done",
    }
    for name, body in stand_ins.items():
        (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    slurm = dict(SLURM_JOB_NODELIST="node0", SLURM_NNODES="1", SLURM_NODEID="0")
    slurm |= dict(SLURM_JOB_ID="42", SLURM_GPUS_ON_NODE="2")
    env = {**os.environ, **slurm, "LOG": str(log), "PATH": f"{bin_}:{os.environ['PATH']}"}
    script = ROOT / "tools" / "slurm_train.sbatch"
    assert "#SBATCH --signal=B:USR1@" in script.read_text()
    proc = subprocess.Popen(["bash", str(script), "recipes/mae_vitb.py"], env=env)
    deadline = time.time() + 30
    while not (log.is_file() and "started" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 75
    calls = log.read_text().splitlines()
    assert calls[1].startswith("TERM launch --multi_gpu") and "--train.resume auto" in calls[1]
    assert calls[2:] == ["scontrol requeue 42"]


def test_a_cpu_launch_of_two_processes_says_it_got_one(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (Accelerate's rule): the
    run says so, with the launch that gives two, instead of training on one in silence."""
    cfg = tiny(tmp_path / "run", max_steps=1, epochs=1, warmup_epochs=0)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = subprocess.run(
        [*cmd, "-m", "ssl_vit", "train", *overrides(cfg)], capture_output=True, text=True, env=ENV
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "x 1 processes" in log
    assert "WARNING 1 process: `accelerate launch --cpu` starts one whatever" in log
    assert "launch with --multi_gpu" in log
