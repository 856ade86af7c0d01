"""DINOv2: iBOT patch loss, KoLeo, Sinkhorn-Knopp, the block-mask generator, the loss assembly,
layer-wise lr decay and schedules against the official code (its function bodies copied below,
made standalone: no process group, no xFormers, no CUDA autocast); the backbone's token-replacement
input against timm; a tiny run; exact resume after SIGKILL."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_METHODS, TINY_MODEL, metrics, train_until_killed
from conftest import tiny as tiny_run
from safetensors.torch import load_file
from torch import nn

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config, ConfigError, validate
from ssl_vit.methods import dinov2 as dinov2_module
from ssl_vit.methods.dino import cross_view_ce
from ssl_vit.methods.dinov2 import (
    DINOv2,
    DINOv2Config,
    batch_masks,
    block_mask,
    ibot_patch_loss,
    koleo_loss,
    mask_upperbound,
    sinkhorn_knopp,
)
from ssl_vit.optim import warmup_cosine
from ssl_vit.train.loop import fit

from tolerances import FORWARD, LOSS_RTOL, ROUNDING

TINY_METHOD = TINY_METHODS["dinov2"]


def make(seed: int = 0, drop_path: float = 0.0, model: dict | None = None, **method) -> DINOv2:
    torch.manual_seed(seed)
    backbone = Backbone(**TINY_MODEL | (model or {}), drop_path_rate=drop_path)
    return DINOv2(backbone, DINOv2Config(**TINY_METHOD | method))


def tiny(run_dir: Path, **train) -> Config:
    """The tiny DINOv2 run: drop path, weight decay 0.04 -> 0.4, teacher temperature warmed up
    over 1 epoch."""
    wd = dict(weight_decay=0.04, weight_decay_end=0.4)
    return tiny_run(run_dir, "dinov2", model=dict(drop_path=0.1), **wd | train)


# ---------------------------------------------------------------------------------------------
# The official code (facebookresearch/dinov2), copied: loss/ibot_patch_loss.py,
# loss/koleo_loss.py, loss/dino_clstoken_loss.py, data/masking.py, data/collate.py,
# utils/param_groups.py, utils/utils.py; process groups and xFormers removed.


def official_lossfunc(t, s, temp):
    return torch.sum(t * F.log_softmax(s / temp, dim=-1), dim=-1)


def official_forward_masked(
    student_patch_tokens_masked,
    teacher_patch_tokens_masked,
    student_masks_flat,
    student_temp=0.1,
    n_masked_patches=None,
    masks_weight=None,
):
    t = teacher_patch_tokens_masked
    s = student_patch_tokens_masked
    loss = official_lossfunc(t, s, student_temp)
    if masks_weight is None:
        masks_weight = (
            (1 / student_masks_flat.sum(-1).clamp(min=1.0))
            .unsqueeze(-1)
            .expand_as(student_masks_flat)[student_masks_flat]
        )
    if n_masked_patches is not None:
        loss = loss[:n_masked_patches]
    loss = loss * masks_weight
    return -loss.sum() / student_masks_flat.shape[0]


class OfficialKoLeoLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x):
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)  # Trick to fill diagonal with -1
        _, I = torch.max(dots, dim=1)  # noqa: E741
        return I

    def forward(self, student_output, eps=1e-8):
        student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
        I = self.pairwise_NNs_inner(student_output)  # noqa: E741
        distances = self.pdist(student_output, student_output[I])  # BxD, BxD -> B
        loss = -torch.log(distances + eps).mean()
        return loss


@torch.no_grad()
def official_sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=3, B=None):
    """DINOLoss.sinkhorn_knopp_teacher; with B: iBOTPatchLoss's (B = n_masked_patches)."""
    teacher_output = teacher_output.float()
    world_size = 1
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1] * world_size if B is None else B
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def official_dino_loss(student_output_list, teacher_out_softmaxed_centered_list, student_temp=0.1):
    total_loss = 0
    for s in student_output_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_out_softmaxed_centered_list:
            loss = torch.sum(t * lsm, dim=-1)
            total_loss -= loss.mean()
    return total_loss


class OfficialMaskingGenerator:
    def __init__(
        self,
        input_size,
        num_masking_patches=None,
        min_num_patches=4,
        max_num_patches=None,
        min_aspect=0.3,
        max_aspect=None,
    ):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def get_shape(self):
        return self.height, self.width

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches=0):
        mask = np.zeros(shape=self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            else:
                mask_count += delta
        return mask


def official_collate_masks(B, mask_ratio_tuple, mask_probability, n_tokens, mask_generator):
    """collate_data_and_cast's masks (the crops left out): (B, N) bool and the upper bound."""
    N = n_tokens
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
    upperbound = 0
    masks_list = []
    for i in range(0, n_samples_masked):
        prob_min = probs[i]
        prob_max = probs[i + 1]
        masks_list.append(
            torch.BoolTensor(mask_generator(int(N * random.uniform(prob_min, prob_max))))
        )
        upperbound += int(N * prob_max)
    for _ in range(n_samples_masked, B):
        masks_list.append(torch.BoolTensor(mask_generator(0)))
    random.shuffle(masks_list)
    return torch.stack(masks_list).flatten(1), upperbound


def official_get_vit_lr_decay_rate(name, lr_decay_rate=1.0, num_layers=12, force_is_backbone=False):
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        if (
            ".pos_embed" in name
            or ".patch_embed" in name
            or ".mask_token" in name
            or ".cls_token" in name
            or ".register_tokens" in name
        ):
            layer_id = 0
        elif force_is_backbone and (
            "pos_embed" in name
            or "patch_embed" in name
            or "mask_token" in name
            or "cls_token" in name
            or "register_tokens" in name
        ):
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def official_get_params_groups_with_decay(model, lr_decay_rate=1.0, patch_embed_lr_mult=1.0):
    n_blocks = len(model.blocks) if hasattr(model, "blocks") else 0
    all_param_groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = name.replace("reg_token", "register_tokens")  # timm's name -> the official one
        decay_rate = official_get_vit_lr_decay_rate(
            name, lr_decay_rate, num_layers=n_blocks, force_is_backbone=n_blocks > 0
        )
        d = {"params": param, "lr_multiplier": decay_rate, "wd_multiplier": 1.0, "name": name}
        if name.endswith(".bias") or "norm" in name or "gamma" in name:
            d.update({"wd_multiplier": 0.0})
        if "patch_embed" in name:
            d.update({"lr_multiplier": d["lr_multiplier"] * patch_embed_lr_mult})
        all_param_groups.append(d)
    return all_param_groups


def official_cosine_scheduler(
    base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0, freeze_iters=0
):
    """utils.utils.CosineScheduler's schedule and __getitem__ as a list over total_iters + 2."""
    freeze_schedule = np.zeros(freeze_iters)
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total_iters - warmup_iters - freeze_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / len(iters))
    )
    schedule = np.concatenate((freeze_schedule, warmup_schedule, schedule))
    return [schedule[it] if it < total_iters else final_value for it in range(total_iters + 2)]


# ---------------------------------------------------------------------------------------------
# Losses


def random_masks(b: int, n: int, g: torch.Generator) -> torch.Tensor:
    """(b, n) bool, every other image unmasked, the others 1..n/2 masked."""
    masks = torch.zeros(b, n, dtype=torch.bool)
    for i in range(0, b, 2):
        masks[i, torch.randperm(n, generator=g)[: 1 + i % (n // 2)]] = True
    return masks


def test_ibot_patch_loss_matches_the_official_forward_masked():
    """Per-image weight 1 / n_masked, summed over the masked patches, over all B images (the
    unmasked count), x loss_scales 2 x ibot_loss_scale 1/2 as ssl_meta_arch scales it; rows of
    padding (weight 0) change nothing."""
    g = torch.Generator().manual_seed(0)
    masks = random_masks(8, 16, g)
    m, k, pad = int(masks.sum()), 32, 5
    student = torch.randn(m + pad, k, generator=g)
    q = torch.softmax(torch.randn(m + pad, k, generator=g) / 0.07, dim=-1)
    weight = (1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    want = official_forward_masked(student, q, masks, n_masked_patches=m) * 2 * (1 / 2)
    got = ibot_patch_loss(student, q, F.pad(weight, (0, pad)), 8, 0.1)
    assert got.item() == pytest.approx(want.item(), rel=LOSS_RTOL)
    # the weighting matters here: the plain mean over masked patches differs
    plain = -(q[:m] * F.log_softmax(student[:m] / 0.1, -1)).sum(-1).mean()
    assert abs(plain.item() - want.item()) > 0.1


def test_koleo_matches_the_official_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 24, generator=g, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    ours, theirs = koleo_loss(x), OfficialKoLeoLoss()(y)
    assert ours.item() == pytest.approx(theirs.item(), rel=LOSS_RTOL)
    ours.backward(), theirs.backward()
    torch.testing.assert_close(x.grad, y.grad, **ROUNDING)


def test_sinkhorn_knopp_matches_the_official_teachers():
    """DINOLoss's (B = rows) and iBOTPatchLoss's (B = the masked-patch count: the same rows in one
    process) Sinkhorn-Knopp; the result is a distribution per row."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 32, generator=g)
    temp = torch.tensor(0.07)
    got = sinkhorn_knopp(logits, temp)
    torch.testing.assert_close(got, official_sinkhorn_knopp_teacher(logits.clone(), 0.07))
    n = torch.tensor([12])
    torch.testing.assert_close(got, official_sinkhorn_knopp_teacher(logits.clone(), 0.07, B=n))
    torch.testing.assert_close(got.sum(-1), torch.ones(12), **ROUNDING)


def test_sinkhorn_knopp_leaves_the_padding_out():
    """Rows padded to the upper bound (valid False), however large their logits: the valid rows'
    targets are those of the official iBOT Sinkhorn-Knopp on them alone (B = n_masked_patches),
    the padded rows 0; with no valid row at all, zeros rather than NaN."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 32, generator=g)
    padded = torch.cat([logits, 50 + torch.randn(5, 32, generator=g)])
    valid = torch.arange(17) < 12
    got = sinkhorn_knopp(padded, torch.tensor(0.07), valid)
    want = official_sinkhorn_knopp_teacher(logits.clone(), 0.07, B=torch.tensor([12]))
    torch.testing.assert_close(got[:12], want, rtol=1e-6, atol=1e-7)
    assert torch.equal(got[12:], torch.zeros(5, 32))
    none = sinkhorn_knopp(padded, torch.tensor(0.07), torch.zeros(17, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(17, 32))


def test_cls_loss_matches_the_official_crop_swapped_assembly():
    """ssl_meta_arch: teacher crops chunked and swapped, each local crop against both teacher
    globals / (2 + 2 N) terms, the globals against the swapped teacher x 2 / (2 + 2 N)."""
    g = torch.Generator().manual_seed(0)
    b, k, n_local = 4, 32, 3
    student = torch.randn((2 + n_local) * b, k, generator=g)
    q = official_sinkhorn_knopp_teacher(torch.randn(2 * b, k, generator=g), 0.07)
    t0, t1 = q.chunk(2)
    swapped = torch.cat([t1, t0]).view(2, b, k)
    terms = 2 * n_local + 2
    local = official_dino_loss(student[2 * b :].chunk(n_local), swapped) / terms
    global_ = official_dino_loss([student[: 2 * b]], [swapped.flatten(0, 1)]) * 2 / terms
    got = cross_view_ce(student, q, 0.1)
    assert got.item() == pytest.approx((local + global_).item(), rel=LOSS_RTOL)


def test_training_step_loss_is_the_official_sum_of_its_terms(monkeypatch):
    """The whole objective on fixed masks, recomputed from the networks with the official
    functions: dino + koleo (each global crop's student cls features) + ibot."""
    dino = make()
    dino.set_schedule(16, 4)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(4, 3, 16, 16, generator=g) for _ in range(3)]
    masks = random_masks(8, 16, g)
    monkeypatch.setattr(dinov2_module, "batch_masks", lambda *a: masks)
    with torch.no_grad():
        dino.mask_token.normal_()
        out = dino.training_step({"crops": crops})

        teacher = dino.teacher.backbone(torch.cat(crops[:2])).tokens
        t_cls = official_sinkhorn_knopp_teacher(dino.teacher.dino_head(teacher[:, 0]), 0.04)
        t_patch = dino.teacher.dino_head(teacher[:, 1:].flatten(0, 1)[masks.flatten()])
        t_patch = official_sinkhorn_knopp_teacher(t_patch, 0.04)
        # the masked input, formed by hand: patch embeddings replaced, then timm's own forward
        tm = dino.backbone.to_timm()
        tm.patch_embed.register_forward_hook(
            lambda mod, args, x: torch.where(masks[..., None], dino.mask_token, x)
        )
        student = tm.forward_features(torch.cat(crops[:2]))
        local = dino.backbone(torch.cat(crops[2:])).tokens[:, 0]
        s_cls = dino.dino_head(torch.cat([student[:, 0], local]))
        s_patch = dino.dino_head(student[:, 1:].flatten(0, 1)[masks.flatten()])
        t0, t1 = t_cls.chunk(2)
        swapped = torch.cat([t1, t0]).view(2, 4, -1)
        terms = 2 * 3 + 2
        dino_loss = official_dino_loss(s_cls[8:].chunk(3), swapped) / terms
        dino_loss += official_dino_loss([s_cls[:8]], [swapped.flatten(0, 1)]) * 2 / terms
        koleo = 0.1 * sum(OfficialKoLeoLoss()(p) for p in student[:, 0].chunk(2))
        ibot = official_forward_masked(s_patch, t_patch, masks)
    assert out["dino_loss"].item() == pytest.approx(dino_loss.item(), rel=1e-4)
    assert out["ibot_loss"].item() == pytest.approx(ibot.item(), rel=1e-4)
    assert 0.1 * out["koleo_loss"].item() == pytest.approx(koleo.item(), rel=1e-4)
    total = dino_loss + koleo + ibot
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-4)


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_padding_to_the_upper_bound_changes_no_loss_gradient_or_center(centering, monkeypatch):
    """The step with its masked rows padded to mask_upperbound (21 rows here for 16 masked) and
    the same step padded to nothing (bound = the draw's own count, as before the padding): the
    same losses, gradients and iBOT center, to float rounding."""
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(4, 3, 16, 16, generator=g) for _ in range(3)]
    masks = random_masks(8, 16, g)
    monkeypatch.setattr(dinov2_module, "batch_masks", lambda *a: masks)
    assert mask_upperbound(8, 16, (0.1, 0.5), 0.5) == 21 > int(masks.sum())
    runs = []
    for bound in (mask_upperbound, lambda *a: int(masks.sum())):
        monkeypatch.setattr(dinov2_module, "mask_upperbound", bound)
        dino = make(centering=centering)
        dino.set_schedule(16, 4)
        out = dino.training_step({"crops": crops})
        out["loss"].backward()
        grads = {k: p.grad for k, p in dino.named_parameters() if p.grad is not None}
        runs.append((out, grads, dino.ibot_center.center.clone()))
    (padded, grads, center), (unpadded, grads_unpadded, center_unpadded) = runs
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
        assert padded[key].item() == pytest.approx(unpadded[key].item(), rel=1e-6, abs=1e-7)
    assert grads.keys() == grads_unpadded.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], grads_unpadded[k], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(center, center_unpadded, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Masks


class TorchRandom:
    """`random.uniform` / `random.randint` for the official generator, drawn as block_mask draws:
    4 uniforms of torch's global generator per block attempt (area, aspect, top, left)."""

    def __init__(self):
        self.u, self.next = [], 4

    def uniform(self, a: float, b: float) -> float:
        if self.next != 1:  # the area: a new attempt
            self.u, self.next = torch.rand(4, dtype=torch.float64).tolist(), 0
        self.next += 1
        return a + (b - a) * self.u[self.next - 1]

    def randint(self, a: int, b: int) -> int:
        self.next += 1
        return a + int(self.u[self.next - 1] * (b - a + 1))


@pytest.mark.parametrize("grid", [(4, 4), (14, 14), (16, 16)])
def test_block_mask_is_the_official_generator_draw_for_draw(grid, monkeypatch):
    """Given the same uniforms, every mask of the official MaskingGenerator(max_num_patches =
    0.5 x patches), for every count asked."""
    monkeypatch.setattr(sys.modules[__name__], "random", TorchRandom())
    h, w = grid
    official = OfficialMaskingGenerator((h, w), max_num_patches=0.5 * h * w)
    for n in [0, 1, 3, *range(4, h * w // 2 + 1, max(1, h * w // 16))] * 5:
        torch.manual_seed(n)
        want = official(n)
        torch.manual_seed(n)
        got = block_mask(h, w, n)
        assert np.array_equal(got, want), n
        assert got.sum() <= n


def test_batch_masks_statistics_match_the_official_collate():
    """Over many batches of 2 x 8 global crops on a 16 x 16 grid: int(16 x 0.5) = 8 masked crops
    per batch, each below its bin's bound int(N x ratio_hi) (their sum below the official
    upperbound), blocks no larger than half the grid, and the masked shares' distribution that of
    the official collate (its own Python RNG) to sampling error."""
    n, grid = 16, (16, 16)
    random.seed(0)
    torch.manual_seed(0)
    official = OfficialMaskingGenerator(grid, max_num_patches=0.5 * 256)
    ours, theirs = [], []
    for _ in range(150):
        masks = batch_masks(n, grid, (0.1, 0.5), 0.5)
        assert masks.shape == (n, 256) and masks.dtype == torch.bool
        counts = masks.sum(-1)
        assert (counts > 0).sum() <= 8 and counts.max() <= 128
        want, upperbound = official_collate_masks(n, (0.1, 0.5), 0.5, 256, official)
        assert counts.sum() <= upperbound == mask_upperbound(n, 256, (0.1, 0.5), 0.5)
        ours.append(counts.sort().values), theirs.append(want.sum(-1).sort().values)
    ours, theirs = torch.stack(ours).float(), torch.stack(theirs).float()
    # the k-th smallest count of a batch: the bin structure (means 0 for the 8 unmasked rows,
    # then rising through the bins); standard error of a mean over 150 batches <= 1.5 patches
    torch.testing.assert_close(ours.mean(0), theirs.mean(0), rtol=0.0, atol=5.0)
    # the spread of each: a bin's width (0.05 x 256) and the generator's shortfall, far below
    # the spread of 8 unstratified ratios' order statistics (~10 patches)
    torch.testing.assert_close(ours.std(0), theirs.std(0), rtol=0.0, atol=2.5)
    assert ours[:, :8].max() == 0 and ours[:, 8:].min() >= 1
    share = ours[:, 8:].mean() / 256
    assert 0.25 < share < 0.32  # the stratified ratios average 0.3, less the generator's shortfall


def test_masks_come_from_the_torch_generator():
    torch.manual_seed(3)
    a = batch_masks(6, (8, 8), (0.1, 0.5), 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, batch_masks(6, (8, 8), (0.1, 0.5), 0.5))
    assert not torch.equal(a, batch_masks(6, (8, 8), (0.1, 0.5), 0.5))


# ---------------------------------------------------------------------------------------------
# Backbone input


@pytest.mark.parametrize("extra", [{}, dict(reg_tokens=2, no_embed_class=True)])
def test_token_replacement_input_against_timm(extra):
    """An empty mask is timm's forward_features; a mask is timm's with the patch embeddings
    replaced (a hook on its patch_embed), registers and no_embed_class included."""
    torch.manual_seed(0)
    backbone = Backbone(**TINY_MODEL, **extra).eval()
    model = backbone.to_timm().eval()
    x = torch.randn(3, 3, 32, 32)
    token = torch.randn(1, 32)
    empty = torch.zeros(3, 16, dtype=torch.bool)
    with torch.no_grad():
        got = backbone(x, mask=empty, mask_token=token).tokens
        torch.testing.assert_close(got, model.forward_features(x), **FORWARD)
        mask = torch.rand(3, 16) < 0.4
        model.patch_embed.register_forward_hook(
            lambda m, a, y: torch.where(mask[..., None], token, y)
        )
        got = backbone(x, mask=mask, mask_token=token).tokens
        torch.testing.assert_close(got, model.forward_features(x), **FORWARD)
        assert not torch.allclose(got, backbone(x).tokens)


# ---------------------------------------------------------------------------------------------
# Optimisation: param groups, schedules


def test_param_groups_are_the_official_layer_decay_and_patch_embed_multiplier():
    """Each parameter's lr and weight-decay multipliers against get_params_groups_with_decay on
    the official submodels (backbone with its mask token, heads); a timm ViT with layer scale and
    registers, as the dinov2 timm models."""
    model = dict(init_values=1e-5, reg_tokens=2, no_embed_class=True)
    dino = make(model=model, ibot_separate_head=True, layerwise_decay=0.8)
    ours = {
        id(p): (g["lr_scale"], g["wd_scale"]) for g in dino.param_groups(0.04) for p in g["params"]
    }
    theirs = official_get_params_groups_with_decay(dino.backbone, 0.8, 0.2)
    for head in (dino.dino_head, dino.ibot_head):
        theirs += official_get_params_groups_with_decay(head, 0.8, 0.2)
    depth = dino.backbone.depth
    mask = official_get_vit_lr_decay_rate("mask_token", 0.8, depth, force_is_backbone=True)
    theirs += [{"params": dino.mask_token, "lr_multiplier": mask, "wd_multiplier": 1.0}]
    trained = [p for p in dino.parameters() if p.requires_grad]
    assert len(theirs) == len(trained) == len(ours)
    for d in theirs:
        name = d.get("name", "mask_token")
        assert ours[id(d["params"])] == pytest.approx((d["lr_multiplier"], d["wd_multiplier"])), (
            name
        )
    assert {s for s, _ in ours.values()} >= {0.8**3 * 0.2, 0.8**3, 0.8**2, 0.8, 1.0}


def test_teacher_temperature_momentum_and_lr_follow_the_official_schedulers():
    """CosineScheduler: the teacher temperature linspace(0.04, 0.07, W) per iteration, then 0.07;
    the momentum cosine 0.992 -> 1; lr linspace warmup from 0, then cosine to min_lr."""
    steps_per_epoch, epochs = 3, 6
    total = steps_per_epoch * epochs
    dino = make(warmup_teacher_temp_epochs=2)
    dino.set_schedule(total, steps_per_epoch)
    temps = official_cosine_scheduler(0.07, 0.07, 6, warmup_iters=6, start_warmup_value=0.04)
    momenta = official_cosine_scheduler(0.992, 1.0, total)
    lrs = official_cosine_scheduler(1e-3, 1e-6, total, warmup_iters=4)
    for step in range(total):
        assert dino.teacher_temp.item() == pytest.approx(temps[min(step, 7)], rel=1e-6), step
        assert warmup_cosine(step, total, 0, 0.992, 1.0) == pytest.approx(momenta[step])
        assert dino.lr_at(step, total, 4, 1e-3, 1e-6) == pytest.approx(lrs[step])
        dino.after_optimizer_step(step, total)


def test_config_errors_name_their_fields():
    cfg = tiny(Path("unused"))
    m = cfg.method
    m.mask_ratio_min_max, m.layerwise_decay, m.koleo_loss_weight = (0.5, 0.1), 0.0, -1.0
    m.local_crop_size, m.ibot_out_dim = 12, 0
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    assert "method.mask_ratio_min_max: need 0 <= min <= max <= 1, got (0.5, 0.1)" in text
    assert "method.layerwise_decay: must be in (0, 1], got 0.0" in text
    assert "method.koleo_loss_weight: must be >= 0" in text
    assert "method.ibot_out_dim: must be >= 1" in text
    assert "method.local_crop_size: must be a positive multiple of the patch size 8" in text


# ---------------------------------------------------------------------------------------------
# Training and resume


@pytest.mark.parametrize("recipe", ["dinov2_vits14", "dinov2_vitb14"])
@pytest.mark.parametrize("registers", [False, True])
def test_recipes_validate_and_build_on_the_meta_device(recipe, registers, monkeypatch):
    """Each DINOv2 recipe, plain and with 4 registers: a valid config whose timm model is a
    patch-14 ViT at 224 px (16 x 16 patches) with 1 or 1 + 4 prefix tokens."""
    import importlib.util

    from ssl_vit.flops import vit_dims

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    monkeypatch.syspath_prepend(str(recipes))  # as run: vitb14 builds on vits14
    path = recipes / f"{recipe}.py"
    spec = importlib.util.spec_from_file_location(recipe, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = validate(module.config(registers=registers))
    assert cfg.method.name == "dinov2" and cfg.model.name.endswith("_dinov2")
    d = vit_dims(cfg.model.name, **cfg.model.timm_kwargs())
    assert (d.patch_size, cfg.model.img_size // d.patch_size) == (14, 16)
    assert d.num_prefix == (5 if registers else 1)
    assert d.embed_dim == {"dinov2_vits14": 384, "dinov2_vitb14": 768}[recipe]


def test_tiny_run_trains_with_sane_teacher_and_frozen_last_layers(tmp_path):
    run = tmp_path / "run"
    cfg = tiny(run, epochs=2, save_every_epochs=1, keep_last=10)
    fit(cfg)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "dino_loss", "ibot_loss", "koleo_loss"))
        total = r["dino_loss"] + r["ibot_loss"] + 0.1 * r["koleo_loss"]
        assert r["loss"] == pytest.approx(total, rel=1e-5)
        assert 0.5 < r["teacher_entropy"] < math.log(64)  # Sinkhorn-Knopp: spread, not uniform
        assert 0 < r["masked_share"] <= 0.25  # half the globals, <= 0.5 of their patches
    key = "dino_head.last_layer.parametrizations.weight.original1"
    torch.manual_seed(0)  # the trainer's seed: the initial weights
    initial = DINOv2(Backbone(**TINY_MODEL), cfg.method).state_dict()
    epoch1, epoch2 = (
        load_file(str(run / "checkpoints" / f"step_{s:07d}" / "model.safetensors")) for s in (4, 8)
    )
    assert torch.equal(epoch1[key], initial[key]) and not torch.equal(epoch2[key], initial[key])
    assert not torch.equal(epoch1["mask_token"], initial["mask_token"])
    exported = load_file(str(run / "backbone" / "model.safetensors"))
    name = "blocks.0.attn.qkv.weight"
    assert torch.equal(exported[name], epoch2[f"teacher.backbone.{name}"])


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """The masks come from torch's CPU generator, saved with the checkpoint: a resumed run draws
    the same masks, so its weights and losses equal the uninterrupted run's."""
    n = 3  # mid-epoch (4 steps per epoch), inside the temperature warmup
    schedule = dict(epochs=10, save_every_steps=n, keep_last=100)
    straight = tmp_path / "straight"
    fit(tiny(straight, max_steps=2 * n, **schedule))
    killed = tmp_path / "killed"
    ckpt = train_until_killed(tiny(killed, **schedule), n)
    fit(tiny(killed, max_steps=2 * n, resume=str(ckpt), **schedule))

    def state(run: Path) -> dict[str, torch.Tensor]:
        return load_file(str(run / "checkpoints" / f"step_{2 * n:07d}" / "model.safetensors"))

    a, b = state(straight), state(killed)
    assert a.keys() == b.keys() and {"mask_token", "teacher_temp", "dino_center.center"} <= a.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]

    def losses(run: Path) -> dict[int, float]:
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: (r["loss"], r["masked_share"]) for r in rows if "loss" in r}

    steps = range(n + 1, 2 * n + 1)
    assert [losses(killed)[s] for s in steps] == [losses(straight)[s] for s in steps]
