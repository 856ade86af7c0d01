"""The training loop end to end on tiny MAE runs: run directory, schedules, accumulation, resume
after SIGKILL, corrupt images, and two CPU processes against one."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_METHODS, TINY_MODEL, metrics, overrides, params, tiny, train_until_killed
from PIL import Image

from ssl_vit.config import Config, ConfigError
from ssl_vit.methods.mae import MAEConfig
from ssl_vit.optim import param_groups, warmup_cosine
from ssl_vit.registry import method_configs
from ssl_vit.train.loop import fit
from ssl_vit.train.state import make_plan
from ssl_vit.weights import complete_checkpoints, latest_checkpoint

from tolerances import GRAD_NORM_RTOL, LOSS_RTOL, ROUNDING, TRAINED

TINY_METHOD = TINY_METHODS["mae"]


def test_run_directory_loss_decrease_and_schedule(tmp_path):
    run = tmp_path / "run"
    cfg = tiny(run, epochs=6, warmup_epochs=1, save_every_epochs=2, keep_last=2)
    result = fit(cfg)

    steps_per_epoch = 32 // 8
    assert result["steps"] == 6 * steps_per_epoch
    assert Config.from_dict(json.loads((run / "config.json").read_text()), method_configs()) == cfg
    # checkpoints every 2 epochs, the last 2 kept, each complete
    assert [p.name for p in complete_checkpoints(run)] == ["step_0000016", "step_0000024"]
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert list((run / "tb").rglob("events.out.tfevents.*"))

    # the exported backbone: timm builds and loads it from its own directory layout
    model = timm.create_model(f"local-dir:{run / 'backbone'}", pretrained=True)
    assert model.num_classes == 0 and model.patch_embed.img_size == (32, 32)
    trained = params(run, 24)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, trained["backbone.blocks.1.mlp.fc2.weight"])

    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 25))
    for r in rows:
        expected = warmup_cosine(r["step"] - 1, 24, 4, 0.05 * 8 / 256, 0.0)
        assert r["lr"] == pytest.approx(expected, rel=1e-12)  # Python floats (float64)
        assert r["grad_norm"] > 0 and r["img_per_s"] > 0
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert result["first_loss"] == first and result["final_loss"] == last
    head = sum(r["loss"] for r in rows[:4]) / 4
    tail = sum(r["loss"] for r in rows[-4:]) / 4
    assert tail < 0.8 * head, (head, tail)


def test_warmup_cosine_endpoints_and_plan():
    assert warmup_cosine(0, 100, 10, 1.0, 0.1) == 0.0
    assert warmup_cosine(5, 100, 10, 1.0, 0.1) == 0.5
    assert warmup_cosine(10, 100, 10, 1.0, 0.1) == 1.0
    assert warmup_cosine(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)

    cfg = tiny(
        Path("unused"),
        batch_size=64,
        effective_batch=4096,
        base_lr=1.5e-4,
        epochs=800,
        warmup_epochs=40,
    )
    plan = make_plan(cfg, num_processes=8, batches_per_epoch=2502)  # ImageNet on 8 GPUs
    assert (plan.accum, plan.effective_batch) == (8, 4096)
    assert plan.peak_lr == pytest.approx(2.4e-3)
    assert plan.steps_per_epoch == 313 and plan.total_steps == 800 * 313
    assert plan.warmup_steps == 40 * 313
    with pytest.raises(ConfigError, match="train.batch_size"):
        make_plan(cfg, num_processes=8, batches_per_epoch=0)


def test_weight_decay_exemptions():
    """MAE's rule (timm's add_weight_decay, no names skipped): the tokens decay; a name list
    (DeiT's no_weight_decay) exempts them too. Against the official code: test_fidelity.py."""
    from ssl_vit.backbone import Backbone
    from ssl_vit.methods.mae import MAE

    mae = MAE(Backbone(**TINY_MODEL), MAEConfig(**TINY_METHOD))
    decay, exempt = mae.param_groups(0.05)
    names = {id(p): n for n, p in mae.named_parameters()}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "backbone.cls_token" in decay_names and "mask_token" in decay_names
    skipped = param_groups(mae, 0.05, ["backbone.cls_token", "mask_token"])[1]["params"]
    assert {"backbone.cls_token", "mask_token"} <= {names[id(p)] for p in skipped}
    assert "backbone.blocks.0.attn.qkv.bias" in exempt_names
    assert "backbone.norm.weight" in exempt_names
    assert (
        "backbone.blocks.0.attn.qkv.weight" in decay_names and "decoder_pred.weight" in decay_names
    )
    # fixed sin-cos position embeddings are not optimised at all
    assert "backbone.pos_embed" not in exempt_names | decay_names
    assert "decoder_pos_embed" not in exempt_names | decay_names
    assert (decay["weight_decay"], exempt["weight_decay"]) == (0.05, 0.0)
    n_trainable = sum(p.requires_grad for p in mae.parameters())
    assert len(decay["params"]) + len(exempt["params"]) == n_trainable


def initial_weight() -> torch.Tensor:
    """A weight as the trainer initialises it (seed 0), to prove training moved it."""
    from ssl_vit.backbone import Backbone
    from ssl_vit.methods.mae import MAE

    torch.manual_seed(0)
    mae = MAE(Backbone(**TINY_MODEL), MAEConfig(**TINY_METHOD))
    return mae.backbone.blocks[0].attn.qkv.weight.detach()


def test_accumulation_equals_large_batch_and_steps_on_short_epochs(tmp_path):
    # same absolute lr: the nominal effective batches (16 vs 12) would scale it differently
    acc = tiny(tmp_path / "acc", batch_size=4, accum_steps=4, epochs=2, warmup_epochs=0, lr=1e-3)
    big = tiny(tmp_path / "big", batch_size=12, epochs=2, warmup_epochs=0, lr=1e-3)
    for cfg in (acc, big):
        cfg.data.synthetic_size = 12  # acc: 3 micro-batches per epoch, fewer than accum_steps
    assert fit(acc)["steps"] == fit(big)["steps"] == 2  # one optimizer step per short epoch
    a, b = params(tmp_path / "acc", 2), params(tmp_path / "big", 2)
    # Adam hides a constant loss scale in the update, so the logged loss and gradient norm
    # (accumulated over the short window) are compared as well
    for ma, mb in zip(metrics(tmp_path / "acc"), metrics(tmp_path / "big"), strict=True):
        assert ma["loss"] == pytest.approx(mb["loss"], rel=LOSS_RTOL)
        assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=GRAD_NORM_RTOL)
    for k in b:
        torch.testing.assert_close(a[k], b[k], **TRAINED)
    assert not torch.allclose(b["backbone.blocks.0.attn.qkv.weight"], initial_weight())


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    n = 3  # 4 steps per epoch: the resume lands mid-epoch
    long_schedule = dict(epochs=40, warmup_epochs=2, save_every_steps=n, keep_last=100)
    straight = tmp_path / "straight"
    fit(tiny(straight, max_steps=2 * n, **long_schedule))

    killed = tmp_path / "killed"
    killed_cfg = tiny(killed, **long_schedule)
    killed_cfg.data.num_workers = 2  # augmentation does not depend on who loads the images
    ckpt_n = train_until_killed(killed_cfg, n)
    assert not (killed / "backbone" / "model.safetensors").exists()

    control = tmp_path / "control"
    shutil.copytree(ckpt_n, control / "checkpoints" / ckpt_n.name)
    resumed_cfg = tiny(killed, max_steps=2 * n, resume=str(ckpt_n), **long_schedule)
    resumed_cfg.data.num_workers = 2
    fit(resumed_cfg)

    a, b = params(straight, 2 * n), params(killed, 2 * n)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed parameters differ"
    losses = {m["step"]: m["loss"] for m in metrics(straight)}
    resumed = [m for m in metrics(killed) if m["step"] > n]  # the killed run logged steps 1..n+
    assert [m["step"] for m in resumed[-n:]] == list(range(n + 1, 2 * n + 1))
    assert [m["loss"] for m in resumed[-n:]] == [losses[s] for s in range(n + 1, 2 * n + 1)]

    # control: the same resume with another RNG state (the one saved at step 2n) draws other
    # masks and diverges
    rng = "random_states_0.pkl"
    shutil.copy(
        straight / "checkpoints" / f"step_{2 * n:07d}" / rng,
        control / "checkpoints" / ckpt_n.name / rng,
    )
    fit(tiny(control, max_steps=2 * n, resume="auto", **long_schedule))
    c = params(control, 2 * n)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [
        ("step_0000010", True),
        ("step_0000020", True),
        ("step_0000030", False),
        ("step_0000040.tmp", True),
    ]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "complete").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step_0000020"


def test_refuses_output_dir_of_another_run_unless_asked(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("old\n")
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already holds another run"):
        fit(tiny(run, epochs=1, warmup_epochs=0))
    assert (run / "metrics.jsonl").read_text() == "old\n"
    fit(tiny(run, epochs=1, warmup_epochs=0, overwrite=True))
    assert "old" not in (run / "metrics.jsonl").read_text()
    assert (run / "notes.txt").read_text() == "keep me"  # only run files are replaced
    # what a start that failed before training leaves (config + log) does not block a retry
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "config.json").write_text("{}")
    (failed / "train.log").write_text("error\n")
    assert fit(tiny(failed, epochs=1, warmup_epochs=0))["steps"] == 4


def write_image_folder(root: Path, good: int, bad: dict[str, bytes]) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    for i in range(good):
        cls = root / f"class_{i % 5}"
        cls.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(cls / f"img_{i:03d}.{'png' if i % 2 else 'jpg'}")
    paths = []
    for name, data in bad.items():
        p = root / "class_0" / name
        p.write_bytes(data)
        paths.append(p)
    return paths


def test_corrupt_images_are_skipped_and_logged(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, format="JPEG")
    bad = write_image_folder(
        tmp_path / "images",
        50,
        {
            "garbage.jpg": os.urandom(300),
            "truncated.jpg": buf.getvalue()[: len(buf.getvalue()) // 2],
            "empty.png": b"",
        },
    )
    cfg = tiny(tmp_path / "run", epochs=2, warmup_epochs=0, batch_size=53)
    cfg.data.path = str(tmp_path / "images")
    result = fit(cfg)
    assert result["steps"] == 2
    assert (tmp_path / "run" / "backbone" / "model.safetensors").exists()
    log = (tmp_path / "run" / "train.log").read_text()
    for p in bad:
        assert str(p) in log
    assert result["skipped_images"] == 6  # 3 per epoch, each replaced by a readable image


def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    k = 3
    one = tiny(tmp_path / "one", batch_size=8, max_steps=k, epochs=4)
    fit(one)
    two = tiny(tmp_path / "two", batch_size=4, max_steps=k, epochs=4)
    # --multi_gpu selects Accelerate's torchrun launcher; without GPUs the processes use gloo
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        "0",  # any free port: suites may run side by side
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "ssl_vit",
        "train",
        *overrides(two),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 processes" not in out.stderr and "x 2 processes" in out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["steps"] == k  # one result line per launch
    # same effective batch, lr, loss and (all-reduced) gradient norm at every step
    for m1, m2 in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert m2["lr"] == m1["lr"]
        assert m2["loss"] == pytest.approx(m1["loss"], rel=LOSS_RTOL)
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=GRAD_NORM_RTOL)
    a, b = params(tmp_path / "one", k), params(tmp_path / "two", k)
    for name in a:
        torch.testing.assert_close(b[name], a[name], **TRAINED)
    assert not torch.allclose(a["backbone.blocks.0.attn.qkv.weight"], initial_weight())


def test_per_parameter_clipping_matches_hand_values():
    from ssl_vit.train.step import clip_per_param_

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.1, 0.0, 0.0])  # norms 5 and 0.1
    total = clip_per_param_([a, b], 1.0)
    assert total.item() == pytest.approx(math.sqrt(25 + 0.01))
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8]), **ROUNDING)  # scaled to norm 1
    torch.testing.assert_close(b.grad, torch.tensor([0.1, 0.0, 0.0]))  # under the bound: kept


def test_weight_decay_schedule_spares_exempt_groups(tmp_path):
    run = tmp_path / "run"
    fit(
        tiny(
            run,
            epochs=2,
            warmup_epochs=0,
            weight_decay=0.04,
            weight_decay_end=0.4,
            clip_grad=0.5,
            clip_mode="param",
        )
    )
    rows = metrics(run)
    for r in rows:
        assert r["weight_decay"] == pytest.approx(warmup_cosine(r["step"] - 1, 8, 0, 0.04, 0.4))
    assert rows[0]["weight_decay"] == pytest.approx(0.04)
    opt = torch.load(run / "checkpoints" / "step_0000008" / "optimizer.bin", weights_only=True)
    decay, exempt = opt["param_groups"]
    assert decay["weight_decay"] == pytest.approx(rows[-1]["weight_decay"])
    assert exempt["weight_decay"] == 0.0


def test_tensorboard_holds_image_summaries_and_training_is_unchanged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain, pictured = tmp_path / "plain", tmp_path / "pictured"
    fit(tiny(plain, epochs=2, warmup_epochs=0))
    fit(tiny(pictured, epochs=2, warmup_epochs=0, image_every_epochs=1, eval_every_epochs=2))
    events = EventAccumulator(str(next((pictured / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["images/attention", "images/mae_reconstruction"]
    assert [e.step for e in events.Images("images/mae_reconstruction")] == [4, 8]
    scalars = events.Tags()["scalars"]  # grouped: train/..., eval/<split>/...
    assert {"train/loss", "train/lr", "train/img_per_s", "eval/val/knn_top1"} <= set(scalars)
    assert all(t.startswith(("train/", "eval/val/")) for t in scalars)
    assert [e.step for e in events.Scalars("eval/val/knn_top1")] == [8]
    a, b = params(plain, 8), params(pictured, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the pictures never touch the training RNG


def test_fsdp_asked_where_accelerate_cannot_shard_is_logged(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what configs/fsdp.yaml's launch sets
    assert fit(tiny(tmp_path / "run", epochs=1, warmup_epochs=0, max_steps=1))["steps"] == 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert "FSDP was asked for" in log and "distributed NO" in log


def test_an_epoch_shorter_than_an_optimizer_step_is_warned_with_its_numbers(tmp_path):
    """32 images, batches of 8, effective batch 64 (8 micro-batches per step): each epoch makes
    one step of 32 images at the lr of 64 (before: only "effective batch 64 = ... x 8
    accumulation")."""
    short = tiny(tmp_path / "short", effective_batch=64, epochs=2, warmup_epochs=0)
    assert fit(short)["steps"] == 2  # one per epoch
    assert (
        "WARNING an epoch of 32 images (4 batches of 8) is shorter than one optimizer step "
        "(effective batch 64 = 8 x 8 accumulation): each epoch makes one step of 32 images, with "
        "the lr scaled for 64 (peak 0.0125); set --train.effective_batch 32 or less"
    ) in (tmp_path / "short" / "train.log").read_text()
    fits = tiny(tmp_path / "fits", effective_batch=32, epochs=1, warmup_epochs=0)
    assert fit(fits)["steps"] == 1
    assert "shorter than one optimizer step" not in (tmp_path / "fits" / "train.log").read_text()


def test_first_loss_is_the_first_steps_own_and_survives_resume(tmp_path):
    """Before: the first logged window's mean, so a 3-step run logging every 20 steps reported
    first_loss == final_loss (the mean of steps 1-3)."""
    every = fit(tiny(tmp_path / "every", max_steps=3))  # logs steps 1, 2, 3
    losses = [r["loss"] for r in metrics(tmp_path / "every")]
    assert every["first_loss"] == losses[0]
    rare = fit(tiny(tmp_path / "rare", max_steps=3, log_every=20))  # logs step 3 alone
    rows = metrics(tmp_path / "rare")
    assert [r["step"] for r in rows] == [3] and rows[0]["first_loss"] == losses[0]
    assert rare["first_loss"] == losses[0] != rare["final_loss"]
    assert rare["final_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)  # the window's mean
    resumed = fit(tiny(tmp_path / "rare", max_steps=5, log_every=20, resume="auto"))
    assert resumed["steps"] == 5 and resumed["first_loss"] == losses[0]


def test_decode_on_device_trains_deterministically_and_refuses_what_it_cannot_run(tmp_path):
    # MAE with workers reading bytes and the (here CPU) device decoding + augmenting batches
    runs = []
    for name in ("a", "b"):
        cfg = tiny(tmp_path / name, epochs=6, save_every_epochs=6)
        cfg.data.decode_on_device = True
        fit(cfg)
        runs.append(tmp_path / name)
    rows = metrics(runs[0])
    assert [r["loss"] for r in rows] == [r["loss"] for r in metrics(runs[1])]  # same crops
    head = sum(r["loss"] for r in rows[:4]) / 4
    tail = sum(r["loss"] for r in rows[-4:]) / 4
    assert tail < 0.8 * head, (head, tail)
    plain = tiny(tmp_path / "plain", epochs=6)
    fit(plain)  # the CPU view draws other crops: the same model, another augmentation stream
    assert [r["loss"] for r in metrics(tmp_path / "plain")] != [r["loss"] for r in rows]

    from ssl_vit.methods.deit import DeiTConfig

    deit = tiny(tmp_path / "deit")
    deit.method = DeiTConfig(num_classes=10, auto_augment="original")
    deit.data.decode_on_device = True
    with pytest.raises(ConfigError, match="method.auto_augment 'original'.* RandAugment"):
        fit(deit)


def test_an_allowed_change_of_the_data_order_restarts_the_epoch_logged(tmp_path, caplog):
    """Stopped after 2 of epoch 0's 4 batches of 8, resumed with batches of 4 (allowed): the
    epoch's order is dealt anew, so it restarts from its first batch, logged, and runs its 8
    batches of 4 (before: 2 batches of the new deal skipped, other samples than trained)."""
    caplog.set_level(logging.WARNING, logger="ssl_vit")
    run = tmp_path / "run"
    fit(tiny(run, epochs=2, warmup_epochs=0, max_steps=2))
    fit(tiny(run, epochs=2, warmup_epochs=0, batch_size=4, resume="auto", resume_changes="allow"))
    assert "the data order changed (train.batch_size): epoch 0 restarts from its first " in (
        caplog.text
    )
    epochs = {r["step"]: r["epoch"] for r in metrics(run)}
    # 16 steps of 8 batches planned: epoch 0 takes steps 3-10, epoch 1 the 6 left (before: 3-8)
    assert epochs[10] == 1.0 and epochs[16] == 1.75
