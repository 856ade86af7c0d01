"""What a run does when things go wrong (docs/architecture.md § Failure modes), on tiny MAE runs:
tampered and damaged checkpoints, divergence, two runs on one directory, a changed config on
resume, curves after a crash, a full disk, stuck workers, bad files, out of memory, a config
error under `accelerate launch`, and the files' permissions."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, metrics, overrides, tiny
from safetensors.torch import load_file
from test_trainer import write_image_folder

from ssl_vit.cli import main
from ssl_vit.cli.runner import run_command
from ssl_vit.config import ConfigError
from ssl_vit.data import SyntheticImages
from ssl_vit.train import checkpoint
from ssl_vit.train.checkpoint import (
    DamagedCheckpointError,
    check_checkpoint,
    check_file,
    write_failed,
)
from ssl_vit.train.loop import fit
from ssl_vit.train.run_dir import run_lock, run_log
from ssl_vit.train.state import RunError
from ssl_vit.weights import (
    CheckpointError,
    UnsafeCheckpointError,
    complete_checkpoints,
    load_classifier,
)

SCHEDULE = dict(epochs=2, warmup_epochs=0, save_every_steps=2, keep_last=100)
"""8 steps of 8 images, a checkpoint every 2 (steps 2, 4, 6, 8 kept)."""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished tiny run: metrics for steps 1..8, checkpoints at 2, 4, 6, 8."""
    run = tmp_path_factory.mktemp("base") / "run"
    fit(tiny(run, **SCHEDULE))
    return run


def copy(base: Path, tmp_path: Path) -> Path:
    shutil.copytree(base, tmp_path / "run")
    return tmp_path / "run"


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


class RunsCode:
    """A pickled object whose unpickling runs `touch target` (os.system, as a tampered file)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


# --- 1. nothing unpickles code -----------------------------------------------------------------


def test_tampered_checkpoint_files_are_refused_unrun(base, tmp_path, capsys):
    run = copy(base, tmp_path)
    assert not list(run.rglob("custom_checkpoint_*"))  # the loop's state is train_state.json
    target = tmp_path / "ran"
    for name in ("random_states_0.pkl", "optimizer.bin"):
        evil = ckpt(run, 8) / name
        original = evil.read_bytes()
        torch.save({"state": RunsCode(target)}, evil)
        for resume in ("auto", str(ckpt(run, 8))):
            with pytest.raises(UnsafeCheckpointError) as e:
                fit(tiny(run, resume=resume, **SCHEDULE))
            msg = str(e.value)
            assert msg.startswith(f"{evil}: refused") and "(posix.system)" in msg
            assert "weights_only" not in msg and not target.exists()
        evil.write_bytes(original)
    extra = ckpt(run, 8) / "custom_checkpoint_0.pkl"  # Accelerate unpickles these fully
    torch.save({"step": RunsCode(target)}, extra)
    with pytest.raises(CheckpointError, match=f"{extra}: not part of the checkpoint"):
        fit(tiny(run, resume="auto", **SCHEDULE))
    extra.unlink()
    assert not target.exists()
    fit(tiny(run, resume="auto", **SCHEDULE))  # restored: it resumes

    # FSDP's sharded checkpoints: torch.distributed.checkpoint pickles its metadata
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(3)}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    check_file(tmp_path / "dcp" / ".metadata")  # plain: passes
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(RunsCode(target)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused.*\(posix\.system\)"):
        check_file(tmp_path / "dcp" / ".metadata")
    assert not target.exists()

    # --checkpoint and a DeiT teacher: our message, not torch's advice to unpickle anyway
    torch.save({"model": RunsCode(target)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_classifier(tmp_path / "evil.pth", "vit_tiny_patch16_224", 10)
    capsys.readouterr()
    assert main(["knn", "--checkpoint", str(tmp_path / "evil.pth")]) == 2
    err = capsys.readouterr().err
    assert "(posix.system)" in err and "weights_only" not in err and not target.exists()


# --- 2. a NaN never reaches a checkpoint -------------------------------------------------------


def test_divergence_stops_the_run_before_a_checkpoint_holds_it(tmp_path):
    run = tmp_path / "run"
    sane = tiny(run, resume="auto", max_steps=4, log_every=20, **SCHEDULE)
    fit(tiny(run, max_steps=2, log_every=20, **SCHEDULE))
    exploding = tiny(run, resume="auto", resume_changes="allow", lr=1e30, log_every=20, **SCHEDULE)
    with pytest.raises(RunError) as e:  # step 3 sends the weights to 1e30, step 4 overflows
        fit(exploding)
    msg = str(e.value)  # before: "a loss, gradient norm or weight was not finite by step 4"
    assert msg.startswith(
        "training diverged: the loss was NaN, the gradient norm was NaN and weight mask_token "
        "held NaN (and 47 more tensors) by step 4, which was not saved; no checkpoint holds it."
    )
    assert f"The newest finite checkpoint is {ckpt(run, 2)}: resume from it" in msg
    assert [c.name for c in complete_checkpoints(run)] == ["step_0000002"]  # 4 was refused
    assert all(
        torch.isfinite(t).all() for t in load_file(str(ckpt(run, 2) / "model.safetensors")).values()
    )
    assert fit(sane)["steps"] == 4  # which resumes

    # found at a log step as well: weights of 1e30 after step 1 overflow step 2's loss
    with pytest.raises(RunError, match=r": the loss was NaN and the gradient norm was NaN at a "
                       r"step in 2\.\.2; .* No checkpoint"):  # fmt: skip
        fit(tiny(tmp_path / "logged", lr=1e30, epochs=1, warmup_epochs=0))


def test_a_windows_flags_say_nan_or_inf_and_in_what():
    """By hand: which of the loss and the gradient norms was NaN or inf, over a window's steps
    (before: one flag, "a loss, gradient norm or weight was not finite")."""
    from ssl_vit.train.state import Window, non_finite

    w = Window(torch.zeros(()))
    w.add(torch.tensor(2.0), 1, 8)
    w.step(torch.tensor(1.0))
    assert w.flags().tolist() == [0, 0, 0, 0] and non_finite(w.flags().tolist()) == ""
    w.add(torch.tensor(float("inf")), 2, 8)
    w.step(torch.tensor(float("nan")))
    w.step(torch.tensor(3.0))  # a finite norm later does not clear it
    assert w.flags().tolist() == [0, 1, 1, 0]
    assert non_finite(w.flags().tolist()) == "the loss was inf and the gradient norm was NaN"
    w.add(torch.tensor(float("-inf")), 1, 8)  # inf - inf
    w.step(torch.tensor(float("inf")))
    assert non_finite(w.flags().tolist(), "weight x held inf") == (
        "the loss was NaN, the gradient norm was NaN, the gradient norm was inf and weight x "
        "held inf"
    )
    w.reset()
    assert w.flags().tolist() == [0, 0, 0, 0]


# --- 3. one run per directory ------------------------------------------------------------------


HOLD = """
import sys
from pathlib import Path
from ssl_vit.train.run_dir import run_lock
with run_lock(Path(sys.argv[1]), main=True):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_on_a_directory_is_refused_and_a_stale_lock_taken_over(tmp_path):
    run = tmp_path / "run"
    cfg = tiny(run, epochs=1, warmup_epochs=0, max_steps=1)
    holder = subprocess.Popen(  # another run holds it: run_lock in another process
        [sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout.readline() == b"held\n"
    with pytest.raises(ConfigError, match="is in use by another run") as e:
        fit(cfg)
    assert f'"pid": {holder.pid}' in str(e.value) and socket.gethostname() in str(e.value)
    holder.communicate()  # its run ends
    assert {p.name for p in run.iterdir()} <= {"run.lock", "train.log"}  # nothing written

    dead = {"pid": 2**22 + 1, "host": socket.gethostname(), "since": "yesterday"}
    (run / "run.lock").write_text(json.dumps(dead))  # a killed run's: no flock held
    assert fit(cfg)["steps"] == 1
    log = (run / "train.log").read_text()
    assert "taking over the lock of a run that is gone" in log
    assert str(dead["pid"]) in log and (run / "run.lock").read_text() == ""  # released


def test_a_killed_runs_orphaned_workers_do_not_keep_its_lock(tmp_path):
    # one write() each (atomic on a pipe): print's text and newline could interleave
    fork = HOLD.replace('print("held", flush=True)', 'os.write(1, b"%d\\n" % os.fork())')
    fork = "import os\n" + fork.replace("sys.stdin.read()", "time.sleep(60)")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\n" + fork, str(tmp_path)], stdout=subprocess.PIPE
    )
    lines = [holder.stdout.readline().strip() for _ in range(2)]
    worker = int(next(x for x in lines if x != b"0"))  # the forked child's pid, from the parent
    holder.kill()
    holder.wait()
    try:
        os.kill(worker, 0)  # the child (as a loader worker) still runs
        with run_lock(tmp_path, main=True):  # the dead run's lock is free all the same
            pass
    finally:
        os.kill(worker, 9)


# --- 4. resume checks the config before writing anything ----------------------------------------


def test_resume_refuses_config_changes_before_writing_anything(base, tmp_path):
    run = copy(base, tmp_path)
    for name in ("step_0000006", "step_0000008"):
        shutil.rmtree(run / "checkpoints" / name)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    wider = tiny(run, resume="auto", model={"embed_dim": 64}, **SCHEDULE)
    wider.train.resume_changes = "allow"  # never enough for the architecture
    with pytest.raises(ConfigError, match=r"architecture or method \(model.embed_dim: 32 -> 64\)"):
        fit(wider)
    longer = tiny(run, resume="auto", **SCHEDULE | dict(epochs=3))
    longer.method.mask_ratio = 0.5
    with pytest.raises(ConfigError) as e:
        fit(longer)
    assert "method.mask_ratio: 0.75 -> 0.5; train.epochs: 2 -> 3" in str(e.value)
    assert "--train.resume_changes allow" in str(e.value)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # config.json, metrics, TensorBoard untouched

    wide_decoder = tiny(run, resume="auto", resume_changes="allow", **SCHEDULE)
    wide_decoder.method.decoder_dim = 64  # other shapes, not named by the architecture keys
    with pytest.raises(CheckpointError, match=r"does not fit the model of this config .*decoder_"):
        fit(wide_decoder)

    longer.train.resume_changes = "allow"
    assert fit(longer)["steps"] == 12
    assert (run / "config.1.json").read_bytes() == before[run / "config.json"]  # history kept
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 3
    log = (run / "train.log").read_text()
    assert "with changed settings: method.mask_ratio: 0.75 -> 0.5; train.epochs: 2 -> 3" in log


def test_a_metrics_file_that_is_not_json_lines_is_refused_naming_its_line(base, tmp_path):
    """Before: JSONDecodeError's traceback. A line cut short at the end (a crash mid-write) is
    left out with a warning; any other bad line is the run's history damaged: refused, kept."""
    run = copy(base, tmp_path)
    metrics_file = run / "metrics.jsonl"
    rows = metrics_file.read_text()
    assert rows.count("\n") == 9  # steps 1..8 and the final result
    metrics_file.write_text(rows + "not json\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=rf"train.resume: {metrics_file}:10 is not a JSON object"):
        fit(tiny(run, resume="auto", **SCHEDULE))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    shutil.rmtree(ckpt(run, 8))
    metrics_file.write_text(rows + '{"step": 9, "lo')  # cut short
    assert fit(tiny(run, resume="auto", **SCHEDULE))["steps"] == 8
    assert [r["step"] for r in metrics(run)] == list(range(1, 9))
    log = (run / "train.log").read_text()
    assert log.count(f"{metrics_file}:10: leaving out a last line cut short") == 1


def test_a_folder_that_holds_no_run_is_refused_resumed_or_not(tmp_path):
    """Before: `--train.resume auto` started in it and wrote its files beside the user's."""
    folder = tmp_path / "folder"
    (folder / "photos").mkdir(parents=True)
    (folder / "photos" / "cat.jpg").write_bytes(b"a photo")
    (folder / "notes.txt").write_text("mine")
    message = rf"train.output_dir: {folder} holds files of no run \(notes.txt, photos/\)"
    for resume in ("auto", ""):
        with pytest.raises(ConfigError, match=message):
            fit(tiny(folder, resume=resume, max_steps=1))
    assert sorted(p.name for p in folder.rglob("*")) == ["cat.jpg", "notes.txt", "photos"]
    (tmp_path / "empty").mkdir()
    for fresh in ("empty", "missing"):  # `auto` starts afresh there
        assert fit(tiny(tmp_path / fresh, resume="auto", max_steps=1))["steps"] == 1


# --- 5. every piece of state is required -------------------------------------------------------


def test_a_checkpoint_missing_a_file_is_an_error_naming_it(base, tmp_path):
    run = copy(base, tmp_path)
    for step in (2, 4, 6):
        shutil.rmtree(ckpt(run, step))
    for name in ("random_states_0.pkl", "optimizer.bin"):
        missing = ckpt(run, 8) / name
        data = missing.read_bytes()
        missing.unlink()
        with pytest.raises(DamagedCheckpointError, match=f"{missing}: missing.*no earlier"):
            fit(tiny(run, resume="auto", **SCHEDULE))
        with pytest.raises(DamagedCheckpointError, match=f"{missing}: missing"):
            fit(tiny(run, resume=str(ckpt(run, 8)), **SCHEDULE))
        missing.write_bytes(data)


def unlist(checkpoint: Path, name: str) -> None:
    """Delete a file of a checkpoint and its line in the `complete` marker, as if never saved."""
    (checkpoint / name).unlink()
    marker = json.loads((checkpoint / "complete").read_text())
    del marker["files"][name]
    (checkpoint / "complete").write_text(json.dumps(marker))


def relist(checkpoint: Path, name: str, text: str) -> None:
    """Rewrite a file of a checkpoint and its size in the marker (a consistent checkpoint)."""
    (checkpoint / name).write_text(text)
    marker = json.loads((checkpoint / "complete").read_text())
    marker["files"][name] = len(text.encode())
    (checkpoint / "complete").write_text(json.dumps(marker))


def test_what_a_checkpoint_must_hold_comes_from_the_code_not_its_marker(base, tmp_path):
    """A file every checkpoint holds, deleted with its line in the marker, is missing: before,
    the marker alone said what to hold, and a resume without random_states_0.pkl ran on (rc 0,
    no warning) and ended elsewhere than the uninterrupted run."""
    run = copy(base, tmp_path)
    shutil.rmtree(run / "backbone")
    for name in ("random_states_0.pkl", "optimizer.bin", "model.safetensors", "config.json"):
        trial = tmp_path / name / "step_0000008"
        shutil.copytree(ckpt(run, 8), trial)
        unlist(trial, name)
        with pytest.raises(DamagedCheckpointError, match=f"^{trial / name}: missing from the c"):
            check_checkpoint(trial)
    # each process's RNG states, and a stream's positions: by train_state.json and config.json
    trial = tmp_path / "more" / "step_0000008"
    shutil.copytree(ckpt(run, 8), trial)
    state = json.loads((trial / "train_state.json").read_text())
    relist(trial, "train_state.json", json.dumps(state | {"num_processes": 2}))
    with pytest.raises(DamagedCheckpointError, match=f"^{trial}/random_states_1.pkl: missing"):
        check_checkpoint(trial)
    relist(trial, "train_state.json", json.dumps(state))
    config = json.loads((trial / "config.json").read_text())
    config["data"]["streaming"] = True
    relist(trial, "config.json", json.dumps(config))
    with pytest.raises(DamagedCheckpointError, match=f"^{trial}/stream_0.json: missing"):
        check_checkpoint(trial)

    # FSDP's sharded model: every shard its .metadata names
    import torch.distributed.checkpoint as dcp

    trial = tmp_path / "fsdp" / "step_0000008"
    shutil.copytree(ckpt(run, 8), trial)
    unlist(trial, "model.safetensors")
    shards = trial / "pytorch_model_fsdp_0"
    dcp.save({"w": torch.ones(3)}, checkpoint_id=shards, no_dist=True)
    marker = json.loads((trial / "complete").read_text())
    marker["files"] |= {str(f.relative_to(trial)): f.stat().st_size for f in shards.iterdir()}
    (trial / "complete").write_text(json.dumps(marker))
    assert check_checkpoint(trial)["step"] == 8  # whole
    unlist(trial, "pytorch_model_fsdp_0/__0_0.distcp")
    with pytest.raises(DamagedCheckpointError, match=f"^{shards}/__0_0.distcp: missing"):
        check_checkpoint(trial)

    # `auto` passes a checkpoint lacking a file, and resumes exactly from the one before
    unlist(ckpt(run, 8), "random_states_0.pkl")
    assert fit(tiny(run, resume="auto", **SCHEDULE))["steps"] == 8
    log = (run / "train.log").read_text()
    assert f"{ckpt(run, 8)}/random_states_0.pkl: missing from the checkpoint" in log
    assert "resumed from" in log and "step_0000006 at step 6" in log
    resumed = load_file(str(ckpt(run, 8) / "model.safetensors"))
    straight = load_file(str(ckpt(base, 8) / "model.safetensors"))
    assert resumed.keys() == straight.keys()
    assert [k for k in straight if not resumed[k].equal(straight[k])] == []  # bit for bit


# --- 6. one value per step after a crash and resume --------------------------------------------


def test_one_row_per_step_after_a_crash_and_resume(base, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = copy(base, tmp_path)  # as a run that logged steps 5..8 after its last save at 4
    fit(tiny(run, resume=str(ckpt(run, 4)), discard_newer=True, **SCHEDULE))
    assert [r["step"] for r in metrics(run)] == list(range(1, 9))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("final" in r for r in rows) == 1
    tb = run / "tb" / "ssl_vit"
    events = EventAccumulator(str(tb))
    events.Reload()
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2  # before and after
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))

    # killed before its first checkpoint: `auto` starts again, and the rows start again too
    shutil.rmtree(run / "checkpoints")
    fit(tiny(run, resume="auto", max_steps=2, **SCHEDULE))
    assert [r["step"] for r in metrics(run)] == [1, 2]
    events = EventAccumulator(str(tb))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


# --- 7. a full disk ----------------------------------------------------------------------------


def test_full_disk_names_the_path_and_free_space_and_cleans_up(tmp_path, monkeypatch):
    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def fills_the_disk(self, output_dir, **kw):
        if output_dir.endswith("step_0000004.tmp"):
            Path(output_dir, "model.safetensors").write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", fills_the_disk)
    run = tmp_path / "run"
    with pytest.raises(RunError) as e:
        fit(tiny(run, **SCHEDULE))
    msg = str(e.value)
    assert msg.startswith("no space left on the device: writing the checkpoint")
    assert f"{ckpt(run, 4)}.tmp" in msg and "MiB free on" in msg and str(ckpt(run, 2)) in msg
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert [c.name for c in complete_checkpoints(run)] == ["step_0000002"]

    # torch's zip writer reports a full disk as a RuntimeError: told by the free space
    tmp = tmp_path / "other" / "checkpoints" / "step_0000002.tmp"
    tmp.mkdir(parents=True)
    monkeypatch.setattr(
        checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(9, 0, 9)
    )
    err = write_failed(RuntimeError("unexpected pos 8448 vs 8342"), tmp, tmp_path / "other")
    assert isinstance(err, RunError) and "0.0 MiB free" in str(err) and not tmp.exists()


def test_any_failed_save_removes_its_partial_checkpoint_and_names_the_file(
    tmp_path, monkeypatch, capsys
):
    """Before: an error other than OSError/RuntimeError (here torch's pickler meeting a lambda
    in optimizer.bin) left step_0000004.tmp and a raw traceback."""
    import accelerate.checkpointing

    save = accelerate.checkpointing.save

    def unpicklable(obj, f, *args, **kwargs):  # model.safetensors is written by then
        if str(f).endswith("step_0000004.tmp/optimizer.bin"):
            obj = {"state": lambda: 0}
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", unpicklable)
    run = tmp_path / "run"
    assert main(["train", *overrides(tiny(run, **SCHEDULE))]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: saving the checkpoint {ckpt(run, 4)}.tmp failed in optimizer.bin "
        "(AttributeError: Can't pickle local object 'test_any_failed_save_removes_its_partial_"
        "checkpoint_and_names_the_file.<locals>.unpicklable.<locals>.<lambda>'); the partial "
        f"checkpoint was removed. The newest complete one is {ckpt(run, 2)}: resume with "
        "--train.resume auto once the cause is fixed"
    )
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]


FILE_SIZE_LIMIT = """
import resource, signal, sys
from ssl_vit.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
limit, argv = int(sys.argv[1]), sys.argv[2:]
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(main(argv))
"""


@pytest.mark.parametrize(
    "limit, fails_in", [(100_000, "model.safetensors"), (300_000, "optimizer.bin")]
)
def test_a_file_size_limit_in_any_file_of_a_save_is_the_message(tmp_path, limit, fails_in):
    """A real limit (RLIMIT_FSIZE, as `ulimit -f`) on the 216 kB model.safetensors (safetensors
    says "os error 27") or the 454 kB optimizer.bin (torch's zip writer: "unexpected pos"). Before:
    a traceback of 12 and 15 frames, and the first left step_0000002.tmp behind."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-c",
        FILE_SIZE_LIMIT,
        str(limit),
        "train",
        *overrides(tiny(run, **SCHEDULE)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: file too large: writing the checkpoint {ckpt(run, 2)}.tmp failed in {fails_in}, "
        f"which reached the file-size limit, {limit / 2**20:.1f} MiB (ulimit -f); the partial "
        "checkpoint was removed. None was saved before: raise the limit or save elsewhere, and "
        "resume with --train.resume auto"
    )
    assert list((run / "checkpoints").iterdir()) == []


def test_a_full_disk_reported_in_an_error_message_is_a_full_disk(tmp_path):
    """safetensors reports ENOSPC only in its message (seen on a 1.5 MB tmpfs): before, that
    SafetensorError went through as a traceback and left the .tmp folder."""
    from safetensors import SafetensorError

    tmp = tmp_path / "checkpoints" / "step_0000002.tmp"
    tmp.mkdir(parents=True)
    e = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    err = write_failed(e, tmp, tmp_path)
    assert isinstance(err, RunError) and not tmp.exists()
    assert str(err).startswith(f"no space left on the device: writing the checkpoint {tmp} failed")


# --- 8. a damaged newest checkpoint, leftovers of a crash ----------------------------------------


def test_damaged_newest_checkpoint_falls_back_and_leftovers_are_cleaned(base, tmp_path):
    run = copy(base, tmp_path)
    weights = ckpt(run, 8) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    leftovers = [ckpt(run, 10).with_suffix(".tmp"), ckpt(run, 1).with_suffix(".deleting")]
    leftovers.append(ckpt(run, 3))  # a step folder without its complete marker
    for p in leftovers:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    assert fit(tiny(run, resume="auto", **SCHEDULE))["steps"] == 8  # steps 7, 8 again
    log = (run / "train.log").read_text()
    assert f"{weights}: " in log and "resuming from the checkpoint before it" in log
    assert "resumed from" in log and "step_0000006 at step 6" in log
    assert not any(p.exists() for p in leftovers)
    assert (run / "checkpoints" / "step_0000008.damaged").is_dir()  # kept aside, named
    assert [c.name[5:] for c in complete_checkpoints(run)] == [
        "0000002",
        "0000004",
        "0000006",
        "0000008",
    ]


# --- 9. retention never deletes what is newer than the resume source -----------------------------


def test_resume_from_an_older_checkpoint_needs_the_flag_and_keep_last_1_is_refused(base, tmp_path):
    run = copy(base, tmp_path)
    with pytest.raises(ConfigError, match="newest checkpoints \\(step_0000006, step_0000008\\)"):
        fit(tiny(run, resume=str(ckpt(run, 4)), **SCHEDULE | dict(keep_last=2)))
    assert len(complete_checkpoints(run)) == 4
    with pytest.raises(ConfigError, match="train.keep_last: must be >= 2, got 1"):
        fit(tiny(run, resume="auto", **SCHEDULE | dict(keep_last=1)))


# --- 10. a stuck loader worker, a run of bad files, out of memory -------------------------------


def test_a_stuck_loader_worker_stops_the_run(tmp_path, monkeypatch):
    import multiprocessing
    import signal

    getitem = SyntheticImages.__getitem__

    def stuck(self, i):  # the forked worker stops itself in its first item (as by SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)
        return getitem(self, i)

    monkeypatch.setattr(SyntheticImages, "__getitem__", stuck)
    cfg = tiny(tmp_path / "run", epochs=1, warmup_epochs=0)
    cfg.data.num_workers, cfg.data.timeout = 1, 2
    start = time.time()
    with pytest.raises(RunError, match=r"no batch from the loader workers for 2 seconds"):
        fit(cfg)
    assert time.time() - start < 60
    time.sleep(0.5)
    assert not multiprocessing.active_children()  # killed, not left stopped (a hang at exit)


@pytest.mark.parametrize("death", ["exit", "kill", "exit_at_once"])
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no traceback from
# the loader's shutdown either (before: 3 of 10 CLI runs printed the death again from its __del__)
def test_a_loader_worker_that_dies_is_one_message_with_the_resume_command(
    tmp_path, monkeypatch, capsys, death
):
    """A forked worker ends itself in item 20 of the second epoch (after checkpoint 4): with
    os._exit(3), as by SIGKILL (the OOM killer), or in its first item at once, which torch may
    not have registered yet. Before: one or two chained tracebacks, no resume hint (and the last
    could wait out data.timeout)."""
    run = tmp_path / "run"
    getitem = SyntheticImages.__getitem__

    def dies(self, i):
        if death == "exit_at_once" or (i == 20 and ckpt(run, 4).is_dir()):
            if death == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(3)
        return getitem(self, i)

    monkeypatch.setattr(SyntheticImages, "__getitem__", dies)
    cfg = tiny(run, **SCHEDULE)
    cfg.data.num_workers = 2
    start = time.time()
    assert main(["train", *overrides(cfg)]) == 1
    assert time.time() - start < 60
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    how = (
        "was killed by SIGKILL (Killed): out of memory?"
        if death == "kill"
        else "exited with code 3"
    )
    assert re.fullmatch(rf"error: a loader worker \(pid \d+\) {re.escape(how)}.*", last), last
    saved = complete_checkpoints(run)  # 4, or 6 when batches fetched before the death last
    assert saved[-1:] in ([], [ckpt(run, 4)], [ckpt(run, 6)])
    resume = f"The newest checkpoint is {saved[-1]}: resume" if saved else "Start again"
    assert (death == "exit_at_once") == (not saved)
    assert last.endswith(f". {resume} with the same command and --train.resume auto"), last


def test_a_run_of_bad_files_is_the_data_error_alone(tmp_path, capsys):
    bad = {f"zz_bad_{i:02d}.jpg": b"not an image" for i in range(70)}  # consecutive by name
    write_image_folder(tmp_path / "images", 150, bad)
    cfg = tiny(tmp_path / "run", epochs=1, warmup_epochs=0, batch_size=16)
    cfg.data.path, cfg.data.num_workers = str(tmp_path / "images"), 2
    assert main(["train", *overrides(cfg)]) == 2
    err = capsys.readouterr().err  # the run's log, then the message
    assert "Traceback" not in err and "Original" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: 64 consecutive images could not be read, ") and "zz_bad_" in last


def test_out_of_memory_is_one_message(capsys):
    def fails(e: Exception) -> int:
        def action(cfg, args):
            raise e

        return run_command(lambda args: tiny(Path("unused")), [], "x", action)

    cpu = (
        "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried"
    )
    for e in (RuntimeError(cpu), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")):
        assert fails(e) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: out of memory (") and "--train.batch_size" in err
        assert len(err.strip().splitlines()) == 1
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        fails(RuntimeError("a bug"))


def test_out_of_memory_while_loading_is_not_called_bad_images(tmp_path, monkeypatch, capsys):
    def no_memory(self, i):  # as torch's allocator fails in a worker that decodes an image
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")

    monkeypatch.setattr(SyntheticImages, "__getitem__", no_memory)
    cfg = tiny(tmp_path / "run", epochs=1, warmup_epochs=0)
    assert main(["train", *overrides(cfg)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: out of memory (") and "could not be read" not in last


# --- 11. a config error under accelerate launch ------------------------------------------------


def test_config_error_under_accelerate_launch_is_the_message(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", "2", "--num_machines", "1", "--main_process_port", "0"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ssl_vit", "train"]
    cmd += ["--train.epochs", "-1", "--train.output_dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    message = "train.epochs: must be positive, got -1.0"
    printed = re.findall(rf"^error: invalid configuration:\n  - {message}", out.stderr, re.M)
    assert len(printed) == 1  # by rank 0
    # torchrun's summary shows it as the root cause, not a pointer to enable tracebacks
    root_cause = out.stderr.split("Root Cause")[1]
    assert f"traceback : error: invalid configuration:\n  - {message}" in root_cause
    assert "To enable traceback" not in root_cause


# --- 12. files readable per the umask ----------------------------------------------------------


def test_run_files_are_readable_per_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        fit(tiny(tmp_path / "run", epochs=1, warmup_epochs=0, max_steps=2))
    finally:
        os.umask(old)
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in (tmp_path / "run").rglob("*")}
    assert modes and {m for p, m in modes.items() if Path(p).is_file()} == {"0o640"}, modes
    assert {m for p, m in modes.items() if Path(p).is_dir()} == {"0o750"}, modes


def test_a_failed_run_leaves_the_root_loggers_level_as_it_found_it(tmp_path):
    """run_log logs the error that ends a run to train.log and restores the root logger's level
    (before: the error's severity was kept in the variable holding that level, and a process
    that trained again logged only errors)."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.DEBUG)
    try:
        with pytest.raises(RuntimeError), run_log(tmp_path, Accelerator(cpu=True)):
            raise RuntimeError("the run broke")
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(before)
    assert "ERROR RuntimeError: the run broke" in (tmp_path / "train.log").read_text()
