"""Fidelity to the official MAE, DINO and DeiT code (docs/fidelity.md, items 1-8): each test
re-implements the official repository's formula (read from facebookresearch/mae, dino, deit) or
computes the case by hand, and compares the suite's default behaviour against it on tiny ViTs.
Only public paths are used (a method's param_groups, a trainer run, load_pretrained, the
evaluators), so each test also states what was different before (docs/fidelity.md, figures)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_METHODS, TINY_MODEL, tiny
from test_checkpoint_import import perturbed
from torch import nn

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config, ModelConfig
from ssl_vit.data.samplers import RepeatedAugSampler
from ssl_vit.eval.features import features
from ssl_vit.eval.finetune import FineTune, FineTuneConfig
from ssl_vit.eval.linear_probe import LinearProbe, LinearProbeConfig, linprobe_config
from ssl_vit.eval.pretrained import pretrained_backbone
from ssl_vit.methods.deit import DeiTConfig
from ssl_vit.methods.dino import DINO, DINOConfig
from ssl_vit.methods.mae import MAE, MAEConfig
from ssl_vit.optim import build_optimizer
from ssl_vit.train.loop import fit
from ssl_vit.weights import export_backbone, load_pretrained

from tolerances import FORWARD, ROUNDING

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def images(size: int = 32, b: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Items 1 and 2: which parameters decay


def official_groups(model: nn.Module, skip: set[str] = frozenset()) -> tuple[set[str], set[str]]:
    """(decayed, exempt) parameter names by the official rules, which are the same expression:
    timm 0.3.2's add_weight_decay (MAE's main_pretrain.py, with no skip list; DeiT's
    create_optimizer, with the model's no_weight_decay()) and DINO's utils.get_params_groups:
    frozen parameters skipped; 1-D shapes, names ending in '.bias' and skipped names exempt."""
    decay, exempt = set(), set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt_it = len(p.shape) == 1 or name.endswith(".bias") or name in skip
        (exempt if exempt_it else decay).add(name)
    return decay, exempt


def ours(model: nn.Module, groups: list[dict]) -> tuple[set[str], set[str]]:
    """(decayed, exempt) parameter names of a method's param_groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    return decay, exempt


def adamw_step(model: nn.Module, groups: list[dict], seed: int = 0) -> list[torch.Tensor]:
    """The parameters after one AdamW step (lr 1e-3) with seeded gradients."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) if p.requires_grad else None
    torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95)).step()
    return [p.detach().clone() for p in model.parameters()]


def test_mae_decays_its_tokens_as_the_official_add_weight_decay():
    """Item 1: MAE's main_pretrain.py builds its groups with timm 0.3.2's add_weight_decay and no
    skip list (MaskedAutoencoderViT has no no_weight_decay): cls_token and mask_token decay."""
    torch.manual_seed(0)
    mae = MAE(Backbone(**TINY_MODEL), MAEConfig(**TINY_METHODS["mae"]))
    decay, exempt = official_groups(mae)
    assert {"backbone.cls_token", "mask_token"} <= ours(mae, mae.param_groups(0.05))[0]
    assert ours(mae, mae.param_groups(0.05)) == (decay, exempt)
    state = {k: v.clone() for k, v in mae.state_dict().items()}
    got = adamw_step(mae, mae.param_groups(0.05))
    mae.load_state_dict(state)
    params = dict(mae.named_parameters())
    official = [
        {"params": [p for n, p in params.items() if n in exempt], "weight_decay": 0.0},
        {"params": [p for n, p in params.items() if n in decay], "weight_decay": 0.05},
    ]
    for a, b in zip(got, adamw_step(mae, official), strict=True):
        assert torch.equal(a, b)


def test_dino_decays_cls_token_and_position_embedding_as_get_params_groups():
    """Item 2: DINO's utils.get_params_groups exempts only biases and 1-D parameters."""
    torch.manual_seed(0)
    dino = DINO(Backbone(**TINY_MODEL), DINOConfig(**TINY_METHODS["dino"]))
    decay, exempt = official_groups(dino)
    assert {"backbone.cls_token", "backbone.pos_embed"} <= ours(dino, dino.param_groups(0.04))[0]
    assert ours(dino, dino.param_groups(0.04)) == (decay, exempt)
    assert not {n for n in decay | exempt if n.startswith("teacher.")}


def test_deit_exempts_the_models_no_weight_decay_names():
    """DeiT (unchanged, for contrast): timm's create_optimizer skips the model's
    no_weight_decay() = {pos_embed, cls_token, dist_token}, names of timm's distilled ViT."""
    from ssl_vit.methods.deit import DeiT

    torch.manual_seed(0)
    deit = DeiT(Backbone(**TINY_MODEL), DeiTConfig(num_classes=10, model_ema=False))
    timm_model = timm.create_model("vit_tiny_patch16_224", **TINY_MODEL_KW, num_classes=10)
    skip = {f"student.backbone.{n}" for n in timm_model.no_weight_decay()}
    assert ours(deit, deit.param_groups(0.05)) == official_groups(deit, skip)


TINY_MODEL_KW = {k: v for k, v in TINY_MODEL.items() if k != "name"}


# ---------------------------------------------------------------------------------------------
# Item 3: DINO's local crops


def official_interpolate_pos_encoding(pos: torch.Tensor, patch: int, w: int, h: int):
    """DINO's vision_transformer.py interpolate_pos_encoding for an input of w x h pixels (w the
    height, dimension 2, as `B, nc, w, h = x.shape` there), written out."""
    n = pos.shape[1] - 1
    side = math.sqrt(n)
    w0, h0 = w // patch + 0.1, h // patch + 0.1  # their guard against float error
    grid = pos[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / side, h0 / side), mode="bicubic")
    assert grid.shape[-2:] == (int(w0), int(h0))
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)


def test_dino_student_sees_local_crops_with_the_official_position_embedding():
    """Item 3: the student's cls token of a 16 px local crop (grid 2 x 2 from 4 x 4) equals the
    official ViT's prepare_tokens (patch embed, cls, interpolate_pos_encoding) + blocks + norm;
    and at ViT-S/16 96 px (14 x 14 -> 6 x 6) the embedding is the official one."""
    head = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    cases = [
        (Backbone(**TINY_MODEL), 8, 16),
        (Backbone("vit_small_patch16_224", img_size=224, depth=2), 16, 96),
    ]
    for backbone, patch, size in cases:
        torch.manual_seed(0)
        dino = DINO(backbone, DINOConfig(**head)).eval()
        bb, crop = dino.backbone, images(size, b=3)
        with torch.no_grad():
            bb.pos_embed.copy_(torch.randn_like(bb.pos_embed))  # not smooth: formulas differ
            dino.teacher.backbone.load_state_dict(bb.state_dict())
            pos = official_interpolate_pos_encoding(bb.pos_embed, patch, size, size)
            x = torch.cat([bb.cls_token.expand(3, -1, -1), bb.patch_embed(crop)], dim=1) + pos
            want = bb.norm(bb.blocks(x))[:, 0]
            student = bb(crop).tokens[:, 0]
            teacher = dino.teacher.backbone(crop).tokens[:, 0]
        torch.testing.assert_close(student, want, **FORWARD)
        torch.testing.assert_close(teacher, want, **FORWARD)


# ---------------------------------------------------------------------------------------------
# Item 4: a new resolution at import, linear probe and fine-tuning


def official_resize(pos: torch.Tensor, side: int, prefix: int = 1) -> torch.Tensor:
    """MAE's util/pos_embed.interpolate_pos_embed and DeiT's main.py (the same formula), written
    out: the square patch grid bicubic to side x side, align_corners False, no antialiasing;
    the prefix positions (cls, and DeiT's dist) kept."""
    n = int((pos.shape[1] - prefix) ** 0.5)
    grid = pos[:, prefix:].reshape(-1, n, n, pos.shape[-1]).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def vit_file(tmp_path, name="vit_tiny_patch16_224", seed=1, **kw):
    model = perturbed(timm.create_model(name, pretrained=False, **{**KW, **kw}), seed)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    return model, tmp_path / "ckpt.pth"


@pytest.mark.parametrize("protocol", ["import", "finetune", "linprobe_mae", "linprobe_dino"])
def test_resolution_change_follows_the_protocols_official_formula(tmp_path, protocol):
    """Item 4: 32 -> 48 px (grid 4 -> 6). MAE's linear probe and fine-tuning, DeiT's main.py and
    (by default) import resize bicubic without antialiasing; DINO's linear probe resizes as its
    interpolate_pos_encoding. Features equal the official model's with that embedding."""
    model, path = vit_file(tmp_path, num_classes=0)
    heads = ModelConfig(img_size=48, num_heads=3)
    if protocol == "import":
        backbone = load_pretrained(path, model=heads)
    else:
        method = (
            FineTuneConfig(checkpoint=str(path))
            if protocol == "finetune"
            else LinearProbeConfig(checkpoint=str(path), protocol=protocol.split("_")[1])
        )
        cfg = Config(model=ModelConfig(name="vit_tiny_patch16_224", img_size=48, num_heads=3))
        cfg.model.patch_size = 8
        cfg.method = method
        backbone = pretrained_backbone(cfg)
    pos = model.pos_embed.detach()
    want = (
        official_interpolate_pos_encoding(pos, 8, 48, 48)
        if protocol == "linprobe_dino"
        else official_resize(pos, 6)
    )
    torch.testing.assert_close(backbone.pos_embed.detach(), want, **ROUNDING)
    big = timm.create_model("vit_tiny_patch16_224", **{**KW, "img_size": 48}, num_classes=0)
    big.load_state_dict(model.state_dict() | {"pos_embed": want})
    with torch.no_grad():
        got, ref = backbone.eval()(images(48)).tokens, big.forward_features(images(48))
    torch.testing.assert_close(got, ref, **FORWARD)


def test_distilled_checkpoint_keeps_cls_and_dist_positions_when_resized(tmp_path):
    """Item 4 with DeiT's extra token: main.py keeps the cls and dist positions unchanged."""
    model, path = vit_file(tmp_path, name="deit_tiny_distilled_patch16_224", num_classes=0)
    backbone = load_pretrained(path, model=ModelConfig(img_size=48, num_heads=3))
    want = official_resize(model.pos_embed.detach(), 6, prefix=2)
    torch.testing.assert_close(backbone.pos_embed.detach(), want, **ROUNDING)


# ---------------------------------------------------------------------------------------------
# Item 5: DINO's lr warmup


def official_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start=0.0):
    """DINO's utils.cosine_scheduler, written out: np.linspace warmup, then a half cosine."""
    warmup = np.array([])
    if warmup_epochs > 0:
        warmup = np.linspace(start, base, warmup_epochs * niter_per_ep)
    iters = np.arange(epochs * niter_per_ep - len(warmup))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


def test_dino_lr_schedule_through_the_trainer_is_the_official_cosine_scheduler(tmp_path):
    """Item 5: 4 epochs of 4 steps, 2 warmup epochs: lr of step i = cosine_scheduler[i], which
    peaks at step W - 1 = 7 (ours used to reach it at step 8)."""
    method = DINOConfig(**TINY_METHODS["dino"])
    cfg = tiny(tmp_path / "run", method, warmup_epochs=2, min_lr=1e-4)
    fit(cfg)
    rows = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "loss" in r]
    peak = 0.05 * 8 / 256
    want = official_cosine_scheduler(peak, 1e-4, 4, 4, warmup_epochs=2)
    np.testing.assert_allclose(lrs, want, rtol=1e-12, atol=0)
    assert lrs[7] == pytest.approx(peak)


# ---------------------------------------------------------------------------------------------
# Item 6: LARS with weight decay


def official_lars(params, grads_per_step, lr, wd, momentum=0.9, trust=0.001):
    """MAE's util/lars.py, written out: for p.ndim > 1, dp = g + wd p scaled by
    trust ||p|| / ||dp|| (1 where a norm is 0); mu = m mu + dp; p -= lr mu."""
    params = [p.clone() for p in params]
    mus = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            dp = g
            if p.ndim > 1:
                dp = dp + wd * p
                pn, un = p.norm(), dp.norm()
                dp = dp * (trust * pn / un if pn > 0 and un > 0 else 1.0)
            mus[i] = momentum * mus[i] + dp
            params[i] = p - lr * mus[i]
    return params


def test_lars_with_weight_decay_as_mae_lars_py():
    """Item 6: MAE's linear probe groups (weight, bias) under train.weight_decay 0.05, 3 steps:
    trust ratio ||w|| / ||g + wd w||, not ||w|| / (||g|| + wd ||w||) (timm's Lars)."""
    torch.manual_seed(0)
    backbone = Backbone(**TINY_MODEL)
    probe = LinearProbe(backbone, LinearProbeConfig(num_classes=5))
    head = probe.heads[0]
    with torch.no_grad():  # wd x w comparable to g: where the two trust ratios part
        head.weight.normal_()
        head.bias.normal_()
    start = [head.weight.detach().clone(), head.bias.detach().clone()]
    opt = build_optimizer(probe.param_groups(0.05), "lars", momentum=0.9)
    for g in opt.param_groups:  # as the trainer sets them each step
        g["lr"], g["weight_decay"] = 0.7 * g.get("lr_scale", 1.0), 0.05 * g["wd_scale"]
    g = torch.Generator().manual_seed(1)
    steps = [[0.02 * torch.randn(p.shape, generator=g) for p in start] for _ in range(3)]
    for grads in steps:
        head.weight.grad, head.bias.grad = (x.clone() for x in grads)
        opt.step()
    want = official_lars(start, steps, lr=0.7, wd=0.05)
    torch.testing.assert_close(head.weight.detach(), want[0], **ROUNDING)
    torch.testing.assert_close(head.bias.detach(), want[1], **ROUNDING)


# ---------------------------------------------------------------------------------------------
# Item 7: distilled DeiT checkpoints keep their distillation token


def distilled(tmp_path, num_classes: int = 10):
    model = timm.create_model("deit_tiny_distilled_patch16_224", **KW, num_classes=num_classes)
    model = perturbed(model, 4)
    torch.save({"model": model.state_dict()}, tmp_path / "deit_distilled.pth")
    return model, tmp_path / "deit_distilled.pth"


def test_knn_and_linear_probe_features_of_a_distilled_checkpoint(tmp_path):
    """Item 7: the k-NN / linear-probe feature is the cls token of the network run with its
    distillation token: DeiT's forward_features (cls, dist, patches) -> x[:, 0]."""
    model, path = distilled(tmp_path)
    backbone = load_pretrained(path, model=ModelConfig(img_size=0, num_heads=3))
    x = images()
    with torch.no_grad():
        want = model.forward_features(x)[:, 0]
        assert torch.equal(features(backbone, x), backbone(x).tokens[:, 0])
        torch.testing.assert_close(features(backbone, x), want, **FORWARD)
        probe = LinearProbe(backbone, LinearProbeConfig(num_classes=10))
        torch.testing.assert_close(probe.features(x), want, **FORWARD)


def test_finetuning_a_distilled_checkpoint_keeps_the_token_and_both_heads(tmp_path):
    """Item 7: DeiT's main.py fine-tunes the distilled model (distillation 'none'): both heads,
    the loss on the class head alone (DistillationLoss 'none'), the prediction their mean (the
    model's eval forward). The export loads into timm's deit_*_distilled, which predicts it."""
    _, path = distilled(tmp_path, num_classes=10)
    backbone = load_pretrained(path, model=ModelConfig(img_size=0, num_heads=3))
    deit = DeiTConfig(num_classes=7, mixup=0.0, cutmix=0.0, label_smoothing=0.0, repeated_aug=1)
    ft = FineTune(backbone, FineTuneConfig(checkpoint=str(path), deit=deit)).eval()
    clf = ft.deit.student
    assert clf.backbone.dist_token is not None and clf.head_dist is not None
    x, labels = images(b=4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        tokens = clf.backbone(x).tokens
        cls, dist = clf.head(tokens[:, 0]), clf.head_dist(tokens[:, 1])
        torch.testing.assert_close(ft.predict(x), (cls + dist) / 2, **ROUNDING)
        loss = ft.training_step({"images": x, "labels": labels})["loss"]
        torch.testing.assert_close(loss, F.cross_entropy(cls, labels), **ROUNDING)
        state, name, kwargs = ft.export_classifier()
        exported = timm.create_model(name, pretrained=False, **kwargs).eval()
        exported.load_state_dict(state, strict=True)
        torch.testing.assert_close(exported(x), ft.predict(x), **FORWARD)


def test_a_distilled_deit_run_exports_its_backbone_with_the_token(tmp_path):
    """Item 7 for our own distilled runs: backbone.safetensors is the distilled network."""
    from ssl_vit.methods.deit import DeiT

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
    cfg = DeiTConfig(num_classes=5, distillation="hard", model_ema=False)
    deit = DeiT(Backbone(**TINY_MODEL), cfg, teacher)
    backbone = deit.export_backbone()
    assert backbone.dist_token is not None and backbone.num_prefix_tokens == 2
    export_backbone(backbone, tmp_path)
    loaded = load_pretrained(tmp_path)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).tokens, deit.student.backbone.eval()(x).tokens)


# ---------------------------------------------------------------------------------------------
# Item 8: repeated augmentation's epoch length (a documented difference, the official one flag
# away)


@pytest.mark.parametrize("n,processes", [(1000, 1), (1000, 3), (5000, 8)])
def test_repeated_aug_trim_gives_rasamplers_epoch_length(n, processes):
    """DeiT's RASampler yields floor(n // 256 * 256 / P) samples per process; ours, by default,
    all n (method.repeated_aug_trim 256 gives the official count)."""
    official = math.floor(n // 256 * 256 / processes)
    trimmed = RepeatedAugSampler(n, processes, 8, repeats=3, seed=0, trim=256)
    assert len(trimmed) == official * processes
    assert len(list(trimmed)) == official * processes
    assert len(RepeatedAugSampler(n, processes, 8, repeats=3, seed=0)) == n


def test_dino_protocol_linear_probe_lr_steps_once_per_epoch_as_eval_linear():
    """eval_linear.py: CosineAnnealingLR(optimizer, epochs, eta_min=0), stepped after each epoch,
    so every iteration of epoch e has lr(e); MAE's protocol moves every iteration."""
    epochs, per_epoch, peak = 5, 7, 0.1
    dino = linprobe_config("dino").method
    dino.num_classes = 3
    probe = LinearProbe(Backbone(**TINY_MODEL), dino)
    probe.set_schedule(epochs * per_epoch, per_epoch)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    official = []
    for _ in range(epochs):
        official += [opt.param_groups[0]["lr"]] * per_epoch
        opt.step()
        sched.step()
    ours = [probe.lr_at(s, epochs * per_epoch, 0, peak, 0.0) for s in range(epochs * per_epoch)]
    assert np.allclose(ours, official, rtol=0, atol=1e-12)
    assert linprobe_config("mae").method.lr_steps == "iteration"
