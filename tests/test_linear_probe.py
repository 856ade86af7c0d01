"""Linear probe: the frozen backbone, MAE's BatchNorm head, DINO's features against timm, the lr
grid's heads stepping at their own lr (hand-computed SGD and LARS steps), per-head accuracy, and a
run through the one training loop that leaves the backbone bit-identical."""

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ssl_vit.backbone import Backbone
from ssl_vit.cli import main as cli_main
from ssl_vit.cli.train import run as run_evaluator
from ssl_vit.eval.accuracy import classification_metrics
from ssl_vit.eval.linear_probe import (
    LinearProbe,
    LinearProbeConfig,
    linprobe_config,
    probe_features,
)
from ssl_vit.optim import build_optimizer
from ssl_vit.weights import export_backbone

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
K = 10


class OneProcess:
    """The accelerator calls classification_metrics makes, for a single process."""

    is_main_process = True

    def autocast(self):
        return contextlib.nullcontext()

    def gather_for_metrics(self, x):
        return x


def backbone(seed: int = 0, **kw) -> Backbone:
    torch.manual_seed(seed)
    return Backbone("vit_tiny_patch16_224", **(TINY | kw))


def images(b: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_mae_protocol_head_batchnorm_without_affine_and_init_std():
    probe = LinearProbe(backbone(), LinearProbeConfig(num_classes=1000, lr_grid=(1.0, 2.0)))
    probe.train()
    assert not probe.backbone.training and probe.norm.training  # the backbone stays in eval
    bn = probe.norm
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert bn.weight is None and bn.bias is None
    trainable = [p for p in probe.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 2 * (32 * 1000 + 1000)  # the two heads only
    for head in probe.heads:
        w = head.weight.detach()
        assert 0.0098 < w.std() < 0.0102 and w.mean().abs() < 3e-4  # 32k draws of std 0.01
        assert torch.equal(head.bias, torch.zeros(1000))
    assert not torch.equal(probe.heads[0].weight, probe.heads[1].weight)


def test_protocol_feature_rules():
    assert probe_features("mae", "auto", 0, 768, 12) == ("cls", 1)
    assert probe_features("dino", "auto", 0, 384, 12) == ("cls", 4)  # ViT-S: last 4 cls
    assert probe_features("dino", "auto", 0, 192, 12) == ("cls", 4)
    assert probe_features("dino", "auto", 0, 768, 12) == ("cls_avgpool", 1)  # ViT-B
    assert probe_features("dino", "auto", 0, 384, 2) == ("cls", 2)  # no more blocks than depth
    assert probe_features("dino", "avgpool", 3, 384, 12) == ("avgpool", 3)  # explicit kept


@pytest.mark.parametrize(("pool", "n_last"), [("auto", 0), ("cls_avgpool", 1)])
def test_dino_features_equal_timm_intermediates(pool, n_last):
    bb = backbone(depth=5)
    probe = LinearProbe(
        bb, LinearProbeConfig(protocol="dino", pool=pool, n_last=n_last, num_classes=K)
    )
    x = images()
    got = probe.features(x)
    model = bb.to_timm().eval()
    n = 4 if pool == "auto" else 1  # dino at width 32 < 768: the last 4 blocks' cls tokens
    with torch.no_grad():
        inter = model.forward_intermediates(
            x, indices=n, return_prefix_tokens=True, norm=True, output_fmt="NLC",
            intermediates_only=True,
        )  # fmt: skip
    parts = [prefix[:, 0] for _, prefix in inter]  # each block's cls token, final norm applied
    if pool == "cls_avgpool":
        parts.append(inter[-1][0].mean(dim=1))  # + the last block's mean patch token
    expected = torch.cat(parts, dim=-1)
    assert got.shape == (8, 32 * len(parts)) and not got.requires_grad
    torch.testing.assert_close(got, expected)


def hand_grads(probe: LinearProbe, x: torch.Tensor, labels: torch.Tensor):
    """Each head's (weight, bias) gradient of its own cross-entropy, written out: BatchNorm with
    the batch's biased variance, softmax, (p - y) f^T / B."""
    cls = probe.backbone.to_timm().eval().forward_features(x)[:, 0].detach()
    f = (cls - cls.mean(0)) / torch.sqrt(cls.var(0, unbiased=False) + 1e-6)
    y = F.one_hot(labels, K).float()
    out = []
    for head in probe.heads:
        z = f @ head.weight.detach().T + head.bias.detach()
        d = (z.exp() / z.exp().sum(-1, keepdim=True) - y) / len(x)
        out.append((d.T @ f, d.sum(0)))
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_each_head_steps_at_its_own_grid_lr(optimizer):
    grid, peak = (1.0, 0.1, 3.0), 0.5
    probe = LinearProbe(backbone(), LinearProbeConfig(num_classes=K, lr_grid=grid))
    x, labels = images(), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    grads = hand_grads(probe, x, labels)
    before = [(h.weight.detach().clone(), h.bias.detach().clone()) for h in probe.heads]
    opt = build_optimizer(probe.param_groups(0.0), optimizer, momentum=0.9)
    for g in opt.param_groups:  # as the trainer sets them each step
        g["lr"], g["weight_decay"] = peak * g["lr_scale"], 0.0
    probe.training_step({"images": x, "labels": labels})["loss"].backward()
    opt.step()
    for head, scale, (w0, b0), (gw, gb) in zip(probe.heads, grid, before, grads, strict=True):
        lr = peak * scale
        if optimizer == "lars":  # MAE's lars.py: weights scaled by 0.001 ||w|| / ||g||, not biases
            gw = gw * 0.001 * w0.norm() / gw.norm()
        for p, p0, step in ((head.weight, w0, lr * gw), (head.bias, b0, lr * gb)):
            # The hand gradient sums over 8 BatchNormed features of another forward (FORWARD-
            # sized differences, ~1e-6 of the largest update), and p0 - step rounds once at |p0|.
            tol = 1e-5 * step.abs().max() + 2 * torch.finfo(torch.float32).eps * p0.abs().max()
            torch.testing.assert_close(p.detach(), p0 - step, rtol=0, atol=tol.item())
        assert (head.bias - b0).abs().max() > 1e-3 * scale  # a real step


def test_per_head_accuracy_reports_the_best_head():
    # 4 images, 2 heads, 6 classes ranked 0 > 1 > ... > 5 unless a one-hot lifts one:
    # head 0 ranks label 0 first (1 / 4 top-1), head 1 hits 3 / 4; every label in both top-5s
    ramp = torch.linspace(0.6, 0.1, 6)
    labels = torch.tensor([0, 1, 2, 3])
    lifted = 10 * F.one_hot(torch.tensor([0, 1, 2, 4]), 6).float()
    logits = torch.stack([ramp.expand(4, 6), ramp + lifted], dim=1)  # (4, heads, classes)
    loader = [{"images": logits, "labels": labels}]
    m = classification_metrics(lambda x: x, loader, OneProcess())
    assert m["head"] == 1 and m["top1"] == 75.0 and m["top1_h0"] == 25.0 and m["top1_h1"] == 75.0
    assert m["top5"] == m["top5_h0"] == m["top5_h1"] == 100.0


def test_linprobe_run_keeps_the_backbone_bit_identical(tmp_path, capsys):
    pre = tmp_path / "pretrained"
    pre.mkdir()
    export_backbone(backbone(seed=3), pre)
    run = tmp_path / "probe"
    code = run_evaluator(
        linprobe_config("mae"),
        [
            "--checkpoint", str(pre), "--train.output_dir", str(run), "--train.epochs", "2",
            "--train.warmup_epochs", "0", "--train.batch_size", "16", "--train.log_every", "1",
            "--train.save_every_steps", "1", "--train.keep_last", "8", "--data.synthetic_size",
            "64", "--data.num_workers", "0", "--method.lr_grid", "1,0.25",
            "--method.head_init_std", "1e-7",
        ],
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    original = load_file(str(pre / "backbone" / "model.safetensors"))
    exported = load_file(str(run / "backbone" / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    for step in range(1, 9):  # the frozen backbone inside every saved training state, too
        state = load_file(str(run / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))
        assert all(torch.equal(state[f"backbone.{k}"], original[k]) for k in original)

    # the resolved protocol is what config.json records
    method = json.loads((run / "config.json").read_text())["method"]
    assert (method["pool"], method["n_last"], method["num_classes"]) == ("cls", 1, K)
    # first step (no warmup, LARS leaves biases unadapted; a negligible init makes both heads'
    # gradients the same): each head's bias moved by its own grid lr
    first = load_file(str(run / "checkpoints" / "step_0000001" / "model.safetensors"))
    db0, db1 = first["heads.0.bias"], first["heads.1.bias"]
    assert db0.abs().max() > 1e-4
    # the heads' different initial weights (std 0.01) change their softmax, hence gradients, at
    # the 1e-4 level; a wrong grid lr would be off by 4x
    torch.testing.assert_close(db1, 0.25 * db0, rtol=1e-3, atol=1e-9)
    assert result["peak_lr"] == pytest.approx(0.1 * 16 / 256)
    assert result["head_lr"] == pytest.approx([0.1 * 16 / 256, 0.025 * 16 / 256])

    # last and best evaluation, each head's accuracy
    evals = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "val_top1" in m]  # fmt: skip
    assert [e["step"] for e in evals] == [4, 8]
    last, best = evals[-1], max(evals, key=lambda e: e["val_top1"])
    assert result["val_top1"] == last["val_top1"] == max(last["val_top1_h0"], last["val_top1_h1"])
    assert result["best_val_top1"] == best["val_top1"] and result["best_step"] == best["step"]
    assert result["val_head"] in (0, 1) and math.isfinite(result["final_loss"])


def test_command_errors_name_the_problem(tmp_path, capsys):
    assert cli_main(["linprobe", "--protocol", "simclr"]) == 2
    assert "--protocol: expected mae or dino" in capsys.readouterr().err
    assert cli_main(["linprobe", "--train.output_dir", str(tmp_path / "x")]) == 2
    assert "--checkpoint: required" in capsys.readouterr().err
    assert cli_main(["linprobe", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "missing: not found" in capsys.readouterr().err
    assert cli_main(["linprobe", "--protocol", "dino", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--method.lr_grid" in out and "(default: sgd)" in out and "(default: 0.001)" in out
