"""DINO: loss, centering and schedules against independent formulations; EMA teacher, frozen last
layer, multi-crop; exact resume after SIGKILL; the weighted k-NN evaluator."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_METHODS, TINY_MODEL, train_until_killed
from conftest import tiny as tiny_run
from PIL import Image
from safetensors.torch import load_file

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, validate
from ssl_vit.data import collate
from ssl_vit.data.transforms import GaussianBlur
from ssl_vit.methods.dino import DINO, DINOConfig, DINOLoss
from ssl_vit.ops import ema_init_share
from ssl_vit.optim import warmup_cosine
from ssl_vit.registry import dino_view
from ssl_vit.train.loop import fit
from ssl_vit.weights import export_backbone

from tolerances import LOSS_RTOL, ROUNDING

TINY_METHOD = TINY_METHODS["dino"]


def make(seed: int = 0, drop_path: float = 0.1, **method) -> DINO:
    torch.manual_seed(seed)
    backbone = Backbone(**TINY_MODEL, drop_path_rate=drop_path)
    return DINO(backbone, DINOConfig(**{**TINY_METHOD, **method}))


def crops(b: int = 4, n_local: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(b, 3, 16, 16, generator=g) for _ in range(n_local)
    ]


def tiny(run_dir: Path, **train) -> Config:
    """The tiny DINO run: drop path, weight decay 0.04 -> 0.4, teacher temperature 0.04 -> 0.07
    over 3 epochs."""
    method = DINOConfig(**TINY_METHOD, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    wd = dict(weight_decay=0.04, weight_decay_end=0.4)
    return tiny_run(run_dir, method, model=dict(drop_path=0.1), **wd | train)


# ---------------------------------------------------------------------------------------------
# Loss, centering, schedules


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_center_and_teacher_temperature_match_the_official_formulation():
    """Official DINOLoss in float64 numpy: loop over (teacher view, student view) pairs, per-epoch
    np.linspace temperature schedule, center EMA after each call."""
    n_local, b, k, steps_per_epoch, epochs = 3, 5, 64, 2, 5
    dino = make(teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    dino.set_schedule(epochs * steps_per_epoch, steps_per_epoch)
    temps = np.concatenate([np.linspace(0.04, 0.07, 3), np.full(epochs - 3, 0.07)])
    center = np.zeros((1, k))
    g = torch.Generator().manual_seed(0)
    for step in range(epochs * steps_per_epoch):
        student = torch.randn((2 + n_local) * b, k, generator=g)
        teacher = 0.1 * torch.randn(2 * b, k, generator=g) + torch.arange(k) / 200  # off-centre
        out = dino.loss(student, teacher, dino.teacher_temp)

        temp = temps[step // steps_per_epoch]
        assert dino.teacher_temp.item() == pytest.approx(temp, rel=1e-6)  # a float32 scalar
        s, t = student.double().numpy(), teacher.double().numpy()
        log_p = np.split(log_softmax(s / 0.1), 2 + n_local)
        log_q = np.split(log_softmax((t - center) / temp), 2)
        ce, kl = [], []
        for iq in range(2):
            for v in range(2 + n_local):
                if v != iq:
                    q = np.exp(log_q[iq])
                    ce.append(np.mean(np.sum(-q * log_p[v], -1)))
                    kl.append(np.mean(np.sum(q * (log_q[iq] - log_p[v]), -1)))
        q_all = np.exp(np.concatenate(log_q))
        assert len(ce) == 2 * (2 + n_local - 1)
        # float32 log-softmax and means against float64 numpy: LOSS_RTOL; the KL is the
        # difference of two O(ln 64) terms, so its float32 error is absolute (~ln 64 x 1e-6)
        assert out["loss"].item() == pytest.approx(np.mean(ce), rel=LOSS_RTOL)
        assert out["kl_teacher_student"].item() == pytest.approx(np.mean(kl), rel=1e-4, abs=1e-5)
        entropy = np.mean(np.sum(-q_all * np.log(q_all), -1))
        assert out["teacher_entropy"].item() == pytest.approx(entropy, rel=LOSS_RTOL)
        assert out["teacher_max_prob"].item() == pytest.approx(q_all.max(-1).mean(), rel=LOSS_RTOL)
        assert out["teacher_batch_max_prob"].item() == pytest.approx(
            q_all.mean(0).max(), rel=LOSS_RTOL
        )
        assert out["center_norm"].item() == pytest.approx(np.linalg.norm(center), rel=LOSS_RTOL)
        center = 0.9 * center + 0.1 * t.mean(0, keepdims=True)
        # a float32 EMA of float32 batch means against float64: ROUNDING-sized, relative beyond 1
        np.testing.assert_allclose(dino.loss.center.double().numpy(), center, rtol=1e-5, atol=1e-6)
        dino.after_optimizer_step(step, epochs * steps_per_epoch)  # the next step's temperature
    assert center[0, -1] > 0.2  # the center really moved


def test_center_averages_the_teacher_outputs_of_all_processes(monkeypatch):
    """With a process group the center is the EMA of the mean over every process's batch. The
    collective is stood in for: this process's 2 rows, another process's 2 rows (summed)."""
    from ssl_vit.methods import dino as dino_module

    other = 3.0 * torch.arange(4.0).expand(2, 4)
    calls = []

    def all_reduce(t: torch.Tensor) -> None:
        calls.append(t.shape)
        t.add_(other.sum(0, keepdim=True))

    dist = dino_module.dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    loss = DINOLoss(4, 0.1, 0.9)
    mine = torch.arange(4.0).expand(2, 4)
    out = loss(torch.randn(6, 4), mine, torch.tensor(0.04))
    assert calls == [torch.Size([1, 4])] and math.isfinite(out["loss"].item())
    # global mean over 4 rows: (1 + 3) / 2 x arange = 2 x arange; center = 0.1 x that
    torch.testing.assert_close(loss.center, 0.2 * torch.arange(4.0)[None])


def test_ema_update_and_momentum_schedule_endpoints():
    dino = make()
    total = 10
    dino.set_schedule(total, 5)
    with torch.no_grad():
        for p in [*dino.backbone.parameters(), *dino.head.parameters()]:
            p.add_(torch.randn_like(p))
    student = [p.detach().clone() for p in [*dino.backbone.parameters(), *dino.head.parameters()]]
    assert len(student) == len(list(dino.teacher.parameters()))

    for step, m in ((0, 0.996), (5, 0.998), (total, 1.0)):  # cosine 0.996 -> 1 per iteration
        assert warmup_cosine(step, total, 0, 0.996, 1.0) == pytest.approx(m)
        before = [p.detach().clone() for p in dino.teacher.parameters()]
        dino.after_optimizer_step(step, total)
        for t, t0, s in zip(dino.teacher.parameters(), before, student, strict=True):
            torch.testing.assert_close(t, m * t0 + (1 - m) * s, **ROUNDING)
        moved = [
            not torch.equal(t, t0) for t, t0 in zip(dino.teacher.parameters(), before, strict=True)
        ]
        assert all(moved) if m < 1 else not any(moved)  # momentum 1 at the end: no change


def test_teacher_has_no_drop_path_and_never_a_gradient_and_last_layer_freezes():
    dino = make(drop_path=0.5, freeze_last_layer=2)
    total, steps_per_epoch = 6, 2
    dino.set_schedule(total, steps_per_epoch)
    assert dino.teacher.backbone.timm_kwargs.get("drop_path_rate") is None
    assert type(dino.backbone.blocks[1].drop_path1).__name__ == "DropPath"
    assert isinstance(dino.teacher.backbone.blocks[1].drop_path1, torch.nn.Identity)
    optimizer = torch.optim.AdamW([p for p in dino.parameters() if p.requires_grad], lr=1e-2)
    last_v = dino.head.last_layer.parametrizations.weight.original1
    x = crops()
    for step in range(total):
        dino.training_step({"crops": x})["loss"].backward()
        assert all(p.grad is None for p in dino.teacher.parameters())
        assert last_v.grad is not None and last_v.grad.abs().sum() > 0
        before = last_v.detach().clone()
        dino.before_optimizer_step(step)
        frozen = step // steps_per_epoch < 2
        assert (last_v.grad is None) == frozen, step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert torch.equal(last_v, before) == frozen, step
        dino.after_optimizer_step(step, total)
    # norm_last_layer: the weight-norm magnitude g is fixed at 1 and not optimised
    g = dino.head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones_like(g))
    # the teacher (no drop path) is deterministic even in train mode; the student is not
    with torch.no_grad():
        t1, t2 = (dino.teacher.backbone(x[0]).tokens for _ in range(2))
        s1, s2 = (dino.backbone(x[0]).tokens for _ in range(2))
    assert torch.equal(t1, t2) and not torch.equal(s1, s2)


def test_weight_decay_schedule_and_frozen_last_layer_through_the_trainer(tmp_path):
    run = tmp_path / "run"
    cfg = tiny(run, epochs=3, save_every_epochs=1, keep_last=10, clip_grad=3.0, clip_mode="param")
    fit(cfg)
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:  # per-iteration cosine 0.04 -> 0.4 over the 12 steps
        assert r["weight_decay"] == pytest.approx(warmup_cosine(r["step"] - 1, 12, 0, 0.04, 0.4))
        assert 0 <= r["teacher_entropy"] <= math.log(64) and 0 < r["teacher_max_prob"] <= 1
    temps = [r["teacher_temp"] for r in rows]  # linspace(0.04, 0.07, 3) per epoch of 4 steps
    # float32 temperatures, logged: one rounding (6e-8 relative) each
    np.testing.assert_allclose(temps, np.repeat([0.04, 0.055, 0.07], 4), rtol=1e-6)
    ckpt = run / "checkpoints"
    torch.manual_seed(0)  # the trainer's seed: the initial weights
    initial = DINO(Backbone(**TINY_MODEL), cfg.method).state_dict()
    key = "head.last_layer.parametrizations.weight.original1"
    epoch1, epoch2 = (load_file(str(ckpt / f"step_{s:07d}" / "model.safetensors")) for s in (4, 8))
    assert torch.equal(epoch1[key], initial[key])  # frozen during the first epoch
    assert not torch.equal(epoch2[key], initial[key])
    assert not torch.equal(epoch1["head.mlp.0.weight"], initial["head.mlp.0.weight"])
    # the exported backbone is the teacher's
    exported = load_file(str(run / "backbone" / "model.safetensors"))
    final = load_file(str(ckpt / "step_0000012" / "model.safetensors"))
    name = "blocks.0.attn.qkv.weight"
    assert torch.equal(exported[name], final[f"teacher.backbone.{name}"])
    assert not torch.equal(exported[name], final[f"backbone.{name}"])


def test_config_errors_name_their_fields():
    cfg = tiny(Path("unused"), epochs=2)
    cfg.method.local_crop_size = 12
    cfg.method.warmup_teacher_temp_epochs = 3
    cfg.method.local_crop_scale = (0.5, 0.2)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    assert "method.local_crop_size: must be a positive multiple of the patch size 8" in text
    assert "method.warmup_teacher_temp_epochs: must be in [0, train.epochs = 2]" in text
    assert "method.local_crop_scale" in text


# ---------------------------------------------------------------------------------------------
# Multi-crop


def test_multi_crop_view_and_each_resolution_runs_as_one_batch():
    cfg = tiny(Path("unused"))
    view = dino_view(cfg)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), np.uint8))
    item = view(image)
    assert [tuple(c.shape) for c in item["crops"]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    # per-view probabilities: blur 1.0 / 0.1 / 0.5, solarisation on the second global only
    pipes = [t.transforms for t in view.transform.transforms]

    blur = [next(s.p for s in p if isinstance(s, GaussianBlur)) for p in pipes]
    assert blur == [1.0, 0.1, 0.5, 0.5, 0.5]
    solarize = [next(s.p for s in p if type(s).__name__ == "RandomSolarize") for p in pipes]
    assert solarize == [0.0, 0.2, 0.0, 0.0, 0.0]

    batch = collate([{**view(image), "labels": 0, "index": i, "skipped": []} for i in range(4)])
    dino = make()
    dino.set_schedule(10, 5)
    seen = {"student": [], "teacher": []}
    for who, bb in (("student", dino.backbone), ("teacher", dino.teacher.backbone)):
        bb.blocks[0].register_forward_pre_hook(lambda m, a, w=who: seen[w].append(a[0].shape))
    dino.training_step(batch)
    # 32 px / patch 8 -> 16 patches + cls; the 16 px locals at their own resolution: 4 + cls
    assert seen["student"] == [torch.Size([8, 17, 32]), torch.Size([12, 5, 32])]
    assert seen["teacher"] == [torch.Size([8, 17, 32])]


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("decode_on_device", [False, True])
def test_resume_after_sigkill_is_bit_identical(tmp_path, decode_on_device):
    """Also with the multi-crop decoded and augmented on the device (here the CPU): its draws are
    keyed by (seed, epoch, batch, rank), so the resumed run sees the same crops."""
    n = 3  # 4 steps per epoch: the resume lands mid-epoch, before the temperature and the
    # last layer change at the epoch boundary
    schedule = dict(epochs=10, save_every_steps=n, keep_last=100)

    def config(run: Path, **train) -> Config:
        cfg = tiny(run, **schedule, **train)
        cfg.data.decode_on_device = decode_on_device
        return cfg

    straight = tmp_path / "straight"
    fit(config(straight, max_steps=2 * n))

    killed = tmp_path / "killed"
    ckpt = train_until_killed(config(killed), n)
    fit(config(killed, max_steps=2 * n, resume=str(ckpt)))

    def state(run: Path) -> dict[str, torch.Tensor]:
        return load_file(str(run / "checkpoints" / f"step_{2 * n:07d}" / "model.safetensors"))

    a, b = state(straight), state(killed)
    assert a.keys() == b.keys()
    for key in ("loss.center", "teacher_temp", "teacher.head.mlp.4.weight", "head.mlp.4.weight"):
        assert key in a
    assert a["teacher_temp"].item() == pytest.approx(0.055)  # epoch 1 of linspace(.04, .07, 3)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]

    def losses(run: Path) -> dict[int, float]:
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert [losses(killed)[s] for s in range(n + 1, 2 * n + 1)] == [
        losses(straight)[s] for s in range(n + 1, 2 * n + 1)
    ]
    if decode_on_device:  # the device view drew the crops, not the loader workers' CPU view
        fit(tiny(tmp_path / "cpu", max_steps=n, **schedule))
        assert losses(tmp_path / "cpu")[1] != losses(straight)[1]


# ---------------------------------------------------------------------------------------------
# k-NN


def test_knn_weighted_votes_and_top5_by_hand():
    from ssl_vit.eval.knn import knn_hits, knn_votes

    bank = torch.tensor([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1], [-1, 0]])
    bank_labels = torch.tensor([0, 1, 1, 2, 0])
    query = torch.tensor([[1.0, 0.0]])  # similarities 1, 0.8, 0.6, 0, -1
    sim, idx = (query @ bank.T).topk(3)
    votes = knn_votes(sim, bank_labels[idx], 0.5, 7)
    # T = 0.5: class 0 gets e^2 = 7.39 from the nearest, class 1 e^1.6 + e^1.2 = 8.27 and wins
    torch.testing.assert_close(
        votes, torch.tensor([[math.exp(2), math.exp(1.6) + math.exp(1.2), 0, 0, 0, 0, 0]])
    )
    labels = torch.tensor([0, 1, 2, 4])
    queries = query.expand(4, 2)
    hits = knn_hits(bank, bank_labels, queries, labels, [3, 1], 0.5, 7)
    # k=3, T=0.5: ranking 1, 0, then the vote-less classes by index (2, 3, ...): top-min(5, k)=3
    assert hits[:, 0].tolist() == [[False, True], [True, True], [False, True], [False, False]]
    # k=1: only the nearest (class 0) votes
    assert hits[:, 1].tolist() == [[True, True], [False, False], [False, False], [False, False]]
    # a sharper temperature lets the single nearest neighbour outvote the two others
    assert knn_hits(bank, bank_labels, query, torch.tensor([0]), [3], 0.1, 7)[0, 0, 0]


def test_knn_eval_matches_direct_computation_and_cli_writes_json(tmp_path, capsys):
    from accelerate import Accelerator

    from ssl_vit.cli.knn import main
    from ssl_vit.eval.features import features
    from ssl_vit.eval.knn import knn_eval, knn_hits

    torch.manual_seed(0)
    backbone = Backbone(**TINY_MODEL)
    cfg = Config(
        model=ModelConfig(**TINY_MODEL),
        data=DataConfig(synthetic_size=60, num_workers=0),
        train=TrainConfig(batch_size=16),
    )
    accelerator = Accelerator(cpu=True)
    got = knn_eval(backbone, cfg, accelerator, ks=(5, 1), temperature=0.07)
    assert backbone.training  # the mode is restored

    from ssl_vit.eval.accuracy import eval_loader

    def all_of(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        batches = list(eval_loader(cfg, split, accelerator))
        with torch.no_grad():
            backbone.eval()
            f = torch.cat([features(backbone, b["images"]) for b in batches])
            backbone.train()
        return torch.nn.functional.normalize(f, dim=-1), torch.cat([b["labels"] for b in batches])

    (bank, bank_y), (val, val_y) = all_of("train"), all_of("val")
    assert len(bank) == 60 and len(val) == 10
    hits = knn_hits(bank, bank_y, val, val_y, (5, 1), 0.07, 10).float().mean(0) * 100
    assert got == pytest.approx(
        {
            "knn_top1": hits[0, 0].item(),
            "knn_top5": hits[0, 1].item(),
            "knn_top1_k1": hits[1, 0].item(),
            "knn_top5_k1": hits[1, 1].item(),
        }
    )

    run = tmp_path / "run"
    run.mkdir()
    export_backbone(backbone, run)
    args = ["--checkpoint", str(run), "--knn.k", "5,1", "--data.synthetic_size", "60"]
    assert main([*args, "--knn.batch_size", "16", "--data.num_workers", "0"]) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and json.loads(line[0]) == json.loads((run / "knn.json").read_text())
    assert json.loads(line[0])["knn_top1"] == pytest.approx(got["knn_top1"])
    assert main(["--knn.k", "0"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint: required" in err and "knn.k: each must be >= 1" in err


def test_collapse_warnings_name_the_likely_cause_and_the_knob(caplog):
    """The issue's run: 4,096 prototypes, momentum 0.996 over 440 steps, entropy 8.30 of
    log 4096 = 8.32 from step 80. The warning names the EMA time constant (250 steps) against
    the run, the share of the teacher still at its initialisation (exp(-0.004 x 441 / 2) = 41%),
    the momentum that leaves < 1% (1 - 2 ln 100 / 441 = 0.9791) and the other knobs; with a fast
    EMA, the teacher's near-identical outputs and BatchNorm in the head (the digits at 0.98)."""
    dino = make(out_dim=4096)
    dino.set_schedule(440, 22)
    with caplog.at_level(logging.WARNING):
        dino.on_log({"step": 80, "teacher_batch_max_prob": 0.0003, "teacher_entropy": 8.30})
    (uniform,) = [r.getMessage() for r in caplog.records]
    assert "collapsed to uniform (entropy 8.300 of log(out_dim) 8.318)" in uniform
    assert "1 / (1 - method.momentum_teacher) = 250 steps against a run of 440 steps" in uniform
    assert "leaves 41% of it at its random initialisation" in uniform
    assert "method.momentum_teacher <= 0.9791 leaves < 1%" in uniform
    assert "method.out_dim 4096" in uniform and "method.teacher_temp (0.04)" in uniform
    caplog.clear()
    fast = make(out_dim=4096, momentum_teacher=0.97)  # 0.97 over 440 steps: 0.1 % left
    fast.set_schedule(440, 22)
    with caplog.at_level(logging.WARNING):
        fast.on_log({"step": 30, "teacher_batch_max_prob": 0.0003, "teacher_entropy": 8.25})
    (uniform,) = [r.getMessage() for r in caplog.records]
    assert "the teacher maps the images to nearly one output" in uniform
    assert "33 steps against a run of 440 steps leaves 0%" in uniform
    assert "method.use_bn_in_head False" in uniform and "momentum_teacher <=" not in uniform
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        dino.on_log({"step": 90, "teacher_batch_max_prob": 0.995, "teacher_entropy": 0.05})
    (one,) = [r.getMessage() for r in caplog.records]
    assert "collapsed to one dimension (0.995 of the batch on one)" in one
    assert "raise method.teacher_temp (0.04)" in one and "method.center_momentum (0.9)" in one
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # healthy: silent
        dino.on_log({"step": 100, "teacher_batch_max_prob": 0.01, "teacher_entropy": 6.0})
    assert not caplog.records


def test_ema_init_share_is_the_product_of_the_official_momentum_schedule():
    """DINO's momentum_schedule = cosine_scheduler(m0, 1, epochs, niter): prod(m_i) against
    ops.ema_init_share's exp(-(1 - m0)(T + 1) / 2), whose exponent is the exact sum of 1 - m_i
    (a first-order estimate of the product: 0.0040 for 0.0039 at 0.98 over 550 steps)."""
    for m0, steps in ((0.996, 440), (0.98, 550), (0.9995, 2000)):
        i = np.arange(steps)
        m = 1 + 0.5 * (m0 - 1) * (1 + np.cos(np.pi * i / steps))
        assert np.sum(1 - m) == pytest.approx((1 - m0) * (steps + 1) / 2, rel=1e-9)
        # log m <= -(1 - m): the share bounds the product from above, by the second-order terms
        share, prod = ema_init_share(m0, steps), np.prod(m)
        assert prod <= share == pytest.approx(prod, rel=steps * (1 - m0) ** 2)
    assert ema_init_share(0.996, 440) == pytest.approx(0.414, abs=1e-3)


def test_head_with_batchnorm_has_the_official_layout_and_batch_statistics():
    """DINO's DINOHead(use_bn=True) (--use_bn_in_head): Linear, BatchNorm, GELU, Linear,
    BatchNorm, GELU, Linear as mlp.0-6 (an official checkpoint's keys); in train mode each
    BatchNorm normalises by the batch's own mean and biased variance (eps 1e-5)."""
    head = make(use_bn_in_head=True).head.train()
    with torch.no_grad():
        for bn in (head.mlp[1], head.mlp[4]):
            bn.weight.normal_(), bn.bias.normal_()
    weights = [k for k in head.state_dict() if k.startswith("mlp.") and k.endswith(".weight")]
    assert weights == [f"mlp.{i}.weight" for i in (0, 1, 3, 4, 6)]
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    h = x
    for linear, bn in ((head.mlp[0], head.mlp[1]), (head.mlp[3], head.mlp[4])):
        z = linear(h)
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5) * bn.weight + bn.bias
        h = torch.nn.functional.gelu(z)
    want = head.last_layer(torch.nn.functional.normalize(head.mlp[6](h), dim=-1))
    torch.testing.assert_close(head(x), want, **ROUNDING)
