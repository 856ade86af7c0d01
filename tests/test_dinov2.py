"""DINOv2: iBOT patch loss, KoLeo, Sinkhorn-Knopp, the block-mask generator, the loss assembly,
layer-wise lr decay and schedules against references written here from the paper's equations and
the official code's behaviour (one process, no xFormers); the backbone's token-replacement input
against timm; a tiny run; exact resume after SIGKILL."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_METHODS, TINY_MODEL, metrics, train_until_killed
from conftest import tiny as tiny_run
from safetensors.torch import load_file
from torch import Tensor

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
# References, written here from the DINOv2 paper (Oquab et al. 2023, section 4) and the
# behaviour of facebookresearch/dinov2 (its losses, MaskingGenerator, collate, parameter groups
# and CosineScheduler), each in a form of its own: loops and plain formulas where ours vectorises,
# one process, float32 as the official code computes.


def ce_terms(students: list[Tensor], teachers: list[Tensor], temp: float = 0.1) -> Tensor:
    """DINO's class-token loss: every (student chunk, teacher chunk) pair contributes the batch
    mean of H(t, softmax(s / temp)) = -sum_k t_k log softmax(s / temp)_k; the terms are summed."""
    total = torch.zeros(())
    for s, t in itertools.product(students, teachers):
        log_p = s / temp - torch.logsumexp(s / temp, dim=-1, keepdim=True)
        total = total + (-(t * log_p).sum(-1)).mean()
    return total


def ibot_reference(student: Tensor, teacher: Tensor, masks: Tensor, temp: float = 0.1) -> Tensor:
    """iBOT's patch loss, image by image: `student` and `teacher` hold one row per masked patch,
    image after image in the order of `masks` (B, N) (extra rows past the masked count, padding,
    are ignored). Image i adds the mean over its n_i masked patches of H(t, softmax(s / temp))
    (nothing when n_i = 0); the sum is divided by B, every image counted."""
    total, row = torch.zeros(()), 0
    for n_i in masks.sum(-1).tolist():
        s, t = student[row : row + n_i], teacher[row : row + n_i]
        row += n_i
        if n_i:
            total = total - (t * F.log_softmax(s / temp, dim=-1)).sum() / n_i
    return total / len(masks)


def koleo_reference(x: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo (Sablayrolles et al. 2019; DINOv2 section 4): -1/n sum_i log(rho_i + eps), rho_i the
    distance of the L2-normalised row i to its nearest other row, the distance taken as the
    official code's PairwiseDistance(2, eps) takes it, ||a - b + eps||."""
    unit = x / x.norm(dim=-1, keepdim=True).clamp(min=eps)
    gaps = (unit[:, None, :] - unit[None, :, :] + eps).norm(dim=-1)  # (n, n)
    rho = (gaps + torch.diag(torch.full((len(x),), math.inf))).min(dim=1).values
    return -torch.log(rho + eps).mean()


def sinkhorn_reference(
    logits: Tensor, temp: float, n_samples: Tensor | int | None = None, iterations: int = 3
) -> Tensor:
    """Sinkhorn-Knopp as in SwAV / DINOv2, in the (samples, prototypes) layout: P = exp(logits /
    temp) scaled to total 1, then `iterations` times each prototype's column to total 1 / K and
    each sample's row to total 1 / B; returned x B, so each row is a distribution. B is the
    number of samples (DINO's cls loss) or the count it is given (iBOT's n_masked_patches)."""
    b = len(logits) if n_samples is None else n_samples
    k = logits.shape[1]
    p = torch.exp(logits.float() / temp)
    p = p / p.sum()
    for _ in range(iterations):
        p = p / (k * p.sum(dim=0, keepdim=True))
        p = p / (b * p.sum(dim=1, keepdim=True))
    return p * b


def place_block(mask: np.ndarray, budget: float, rng, tries: int = 10, min_area: int = 4) -> int:
    """One block of MaskingGenerator: a try draws an area ~ U(min_area, budget) and a log aspect
    ~ U(log 0.3, log 1/0.3) (rng.uniform, in that order), rounds sqrt(area x aspect) rows and
    sqrt(area / aspect) columns (Python's round); a block as tall or as wide as the grid is
    discarded before any position is drawn; otherwise its corner is rng.randint(0, rows left),
    rng.randint(0, columns left). The block is taken when it masks between 1 and `budget` new
    patches. Returns the patches it masked, 0 when every try failed."""
    for _ in range(tries):
        area = rng.uniform(min_area, budget)
        aspect = math.exp(rng.uniform(math.log(0.3), -math.log(0.3)))
        rows, cols = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if rows >= mask.shape[0] or cols >= mask.shape[1]:
            continue
        r0 = rng.randint(0, mask.shape[0] - rows)
        c0 = rng.randint(0, mask.shape[1] - cols)
        fresh = ~mask[r0 : r0 + rows, c0 : c0 + cols]
        if 0 < fresh.sum() <= budget:
            mask[r0 : r0 + rows, c0 : c0 + cols] = True
            return int(fresh.sum())
    return 0


def masking_reference(grid: tuple[int, int], n: int, rng) -> np.ndarray:
    """MaskingGenerator(grid, max_num_patches = half the grid)(n): blocks are added while fewer
    than n patches are masked, each allowed min(n - masked, half the grid) new patches; the first
    block that cannot be placed ends the mask (it may stay short of n)."""
    mask = np.zeros(grid, dtype=bool)
    half = 0.5 * grid[0] * grid[1]
    while mask.sum() < n and place_block(mask, min(n - int(mask.sum()), half), rng):
        pass
    return mask


def collate_reference(
    n_images: int, ratio: tuple[float, float], probability: float, grid: tuple[int, int], rng
) -> tuple[Tensor, int]:
    """collate_data_and_cast's masks: int(B x probability) images, image j masking
    int(N x u) patches with u ~ U(edge j, edge j + 1) of float32 linspace(ratio) (the u drawn
    just before its mask), the others none, the list then rng.shuffle'd. Returns (B, N) bool and
    the upper bound, the sum of int(N x upper edge) in float32."""
    n = grid[0] * grid[1]
    n_masked = int(n_images * probability)
    edges = torch.linspace(*ratio, n_masked + 1)
    masks = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        masks.append(masking_reference(grid, int(n * rng.uniform(lo, hi)), rng))
    masks += [np.zeros(grid, dtype=bool)] * (n_images - n_masked)
    rng.shuffle(masks)
    bound = int((n * edges[1:]).long().sum())
    return torch.from_numpy(np.stack(masks)).flatten(1), bound


STEM = ("patch_embed.", "pos_embed", "cls_token", "reg_token", "mask_token")


def multipliers_reference(
    name: str, depth: int, decay: float, patch_embed_mult: float
) -> tuple[float, float]:
    """(lr, weight decay) multipliers of a parameter, named within its submodel as
    get_params_groups_with_decay sees it: in a backbone of `depth` blocks the stem (patch and
    position embedding, cls / register / mask tokens) sits depth + 1 layers below the top and
    block i depth - i; anything else (the final norm, a head: depth 0) at the top. lr = decay to
    that distance, x patch_embed_mult for the patch embedding; no weight decay for biases,
    norms and layer scale (`gamma`)."""
    below = 0
    if name.startswith(STEM):
        below = depth + 1
    elif name.startswith("blocks."):
        below = depth - int(name.split(".")[1])
    lr = decay**below * (patch_embed_mult if name.startswith("patch_embed.") else 1.0)
    exempt = name.endswith(".bias") or "norm" in name or "gamma" in name
    return lr, 0.0 if exempt else 1.0


def schedule_reference(
    i: int, base: float, final: float, total: int, warmup: int = 0, start: float = 0.0
) -> float:
    """CosineScheduler[i]: `warmup` iterations evenly from `start` to `base` (both ends
    included), then final + (base - final) (1 + cos(pi j / C)) / 2 over the C = total - warmup
    remaining iterations j = 0..C-1; `final` from `total` on."""
    if i >= total:
        return final
    if i < warmup:
        return start + (base - start) * (i / (warmup - 1) if warmup > 1 else 0.0)
    j, c = i - warmup, total - warmup
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * j / c))


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
    want = ibot_reference(student, q, masks) * 2 * (1 / 2)
    got = ibot_patch_loss(student, q, F.pad(weight, (0, pad)), 8, 0.1)
    assert got.item() == pytest.approx(want.item(), rel=LOSS_RTOL)
    # the weighting matters here: the plain mean over masked patches differs
    plain = -(q[:m] * F.log_softmax(student[:m] / 0.1, -1)).sum(-1).mean()
    assert abs(plain.item() - want.item()) > 0.1


def test_koleo_matches_the_official_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 24, generator=g, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    ours, theirs = koleo_loss(x), koleo_reference(y)
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
    torch.testing.assert_close(got, sinkhorn_reference(logits, 0.07))
    n = torch.tensor([12])
    torch.testing.assert_close(got, sinkhorn_reference(logits, 0.07, n_samples=n))
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
    want = sinkhorn_reference(logits, 0.07, n_samples=torch.tensor([12]))
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
    q = sinkhorn_reference(torch.randn(2 * b, k, generator=g), 0.07)
    t0, t1 = q.chunk(2)
    swapped = torch.cat([t1, t0]).view(2, b, k)
    terms = 2 * n_local + 2
    local = ce_terms(student[2 * b :].chunk(n_local), swapped.unbind(0)) / terms
    global_ = ce_terms([student[: 2 * b]], [swapped.flatten(0, 1)]) * 2 / terms
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
        t_cls = sinkhorn_reference(dino.teacher.dino_head(teacher[:, 0]), 0.04)
        t_patch = dino.teacher.dino_head(teacher[:, 1:].flatten(0, 1)[masks.flatten()])
        t_patch = sinkhorn_reference(t_patch, 0.04)
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
        dino_loss = ce_terms(s_cls[8:].chunk(3), swapped.unbind(0)) / terms
        dino_loss += ce_terms([s_cls[:8]], [swapped.flatten(0, 1)]) * 2 / terms
        koleo = 0.1 * sum(koleo_reference(p) for p in student[:, 0].chunk(2))
        ibot = ibot_reference(s_patch, t_patch, masks)
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
def test_block_mask_is_the_official_generator_draw_for_draw(grid):
    """Given the same uniforms, every mask of the official MaskingGenerator(max_num_patches =
    0.5 x patches), for every count asked."""
    h, w = grid
    for n in [0, 1, 3, *range(4, h * w // 2 + 1, max(1, h * w // 16))] * 5:
        torch.manual_seed(n)
        want = masking_reference((h, w), n, TorchRandom())
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
    rng = random.Random(0)
    torch.manual_seed(0)
    ours, theirs = [], []
    for _ in range(150):
        masks = batch_masks(n, grid, (0.1, 0.5), 0.5)
        assert masks.shape == (n, 256) and masks.dtype == torch.bool
        counts = masks.sum(-1)
        assert (counts > 0).sum() <= 8 and counts.max() <= 128
        want, upperbound = collate_reference(n, (0.1, 0.5), 0.5, grid, rng)
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
    depth = dino.backbone.depth
    submodels = [(dino.backbone, depth), (dino.dino_head, 0), (dino.ibot_head, 0)]
    theirs = [
        (name, p, multipliers_reference(name, layers, 0.8, 0.2))
        for net, layers in submodels
        for name, p in net.named_parameters()
        if p.requires_grad
    ]
    mask = multipliers_reference("mask_token", depth, 0.8, 0.2)  # a backbone stem token there
    theirs.append(("mask_token", dino.mask_token, mask))
    trained = [p for p in dino.parameters() if p.requires_grad]
    assert len(theirs) == len(trained) == len(ours)
    for name, p, want in theirs:
        assert ours[id(p)] == pytest.approx(want), name
    assert {s for s, _ in ours.values()} >= {0.8**3 * 0.2, 0.8**3, 0.8**2, 0.8, 1.0}


def test_teacher_temperature_momentum_and_lr_follow_the_official_schedulers():
    """CosineScheduler: the teacher temperature linspace(0.04, 0.07, W) per iteration, then 0.07;
    the momentum cosine 0.992 -> 1; lr linspace warmup from 0, then cosine to min_lr."""
    steps_per_epoch, epochs = 3, 6
    total = steps_per_epoch * epochs
    dino = make(warmup_teacher_temp_epochs=2)
    dino.set_schedule(total, steps_per_epoch)
    for step in range(total):
        temp = schedule_reference(min(step, 7), 0.07, 0.07, 6, warmup=6, start=0.04)
        assert dino.teacher_temp.item() == pytest.approx(temp, rel=1e-6), step
        momentum = schedule_reference(step, 0.992, 1.0, total)
        assert warmup_cosine(step, total, 0, 0.992, 1.0) == pytest.approx(momentum)
        lr = schedule_reference(step, 1e-3, 1e-6, total, warmup=4)
        assert dino.lr_at(step, total, 4, 1e-3, 1e-6) == pytest.approx(lr)
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
