"""DINOv3's objective (methods/dinov3.py): the Gram loss against a hand-worked case and a
re-implementation here for each option; the total as the sum of its weighted parts; the Gram
teacher's schedule, its absence from the optimizer and from the gradients; a tiny run on a DINOv3
backbone resumes bit-identically with the Gram loss active on both sides of the stop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import TINY_METHODS, metrics, params, tiny
from test_backbone_dinov3 import DINOV3_MODEL

from ssl_vit.config import Config, validate
from ssl_vit.data.samplers import MixedSizes, size_choice
from ssl_vit.data.transforms import ViewChoice
from ssl_vit.methods.dinov2 import ibot_masks
from ssl_vit.methods.dinov3 import DINOv3, DINOv3Config, GramConfig, gram_loss
from ssl_vit.registry import TRAINABLE, build_method, dino_crops, dino_view, prepare
from ssl_vit.train.loop import fit
from ssl_vit.train.run import build_data

# 2 images, 3 patches, 2 channels
STUDENT = torch.tensor(
    [[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [[3.0, 4.0], [0.0, 2.0], [-5.0, 0.0]]]
)
TEACHER = torch.tensor(
    [[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], [[2.0, 0.0], [0.0, -3.0], [0.0, 1.0]]]
)
# Worked by hand. Normalised, image 1: S = [[1,0,1],[0,1,0],[1,0,1]], T = [[1,1,-1],[1,1,-1],
# [-1,-1,1]], squared differences summing to 12; image 2: S off-diagonal ab .8, ac -.6, bc 0,
# T off-diagonal 0, 0, -1: 2 (.64 + .36 + 1) = 4. Mean over 18 entries: 16 / 18.
# Teacher negatives to 0: image 1 sums 4, image 2 2 (.64 + .36) = 2: 6 / 18. Both: image 2's
# student -.6 goes too: 4 + 2 (.64) = 5.28, / 18. Not normalised: image 1 is unit already (12);
# image 2: S = [[25,8,-15],[8,4,0],[-15,0,25]], T = [[4,0,0],[0,9,-3],[0,-3,1]]: 441 + 25 + 576
# + 2 (64 + 225 + 9) = 1638: (12 + 1638) / 18.
HAND = [
    (dict(), 16 / 18),
    (dict(remove_neg="teacher"), 6 / 18),
    (dict(remove_neg="both"), 5.28 / 18),
    (dict(normalized=False), 1650 / 18),
]


@pytest.mark.parametrize(("kw", "want"), HAND, ids=str)
def test_gram_loss_equals_the_hand_worked_case(kw, want):
    got = gram_loss(STUDENT, TEACHER, **kw).item()
    assert abs(got - want) <= 1e-6 * max(1.0, want)


def reference(student, teacher, normalized, remove_neg, img_level) -> float:
    """Entry by entry in float64: cosine (or dot) of every pair of patches of an image (of the
    whole batch without img_level), negatives dropped as asked, squared difference, mean."""
    s, t = student.double(), teacher.double()
    groups = (
        [(s[b], t[b]) for b in range(len(s))] if img_level else [(s.flatten(0, 1), t.flatten(0, 1))]
    )
    total, count = 0.0, 0
    for xs, xt in groups:
        for i in range(len(xs)):
            for j in range(len(xs)):
                a = float(xs[i] @ xs[j])
                b = float(xt[i] @ xt[j])
                if normalized:
                    a /= float(xs[i].norm() * xs[j].norm())
                    b /= float(xt[i].norm() * xt[j].norm())
                if remove_neg in ("teacher", "both"):
                    b = max(b, 0.0)
                if remove_neg == "both":
                    a = max(a, 0.0)
                total += (a - b) ** 2
                count += 1
    return total / count


OPTIONS = [
    (normalized, remove_neg, img_level)
    for normalized in (True, False)
    for remove_neg in ("none", "teacher", "both")
    for img_level in (True, False)
]


@pytest.mark.parametrize(("normalized", "remove_neg", "img_level"), OPTIONS, ids=str)
def test_gram_loss_equals_the_reimplementation(normalized, remove_neg, img_level):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    got = gram_loss(student, teacher, normalized, remove_neg, img_level).item()
    want = reference(student, teacher, normalized, remove_neg, img_level)
    assert want > 0.05 and abs(got - want) <= 1e-5 * max(1.0, want)
    if (remove_neg, img_level) != ("none", True):  # the option shows
        plain = reference(student, teacher, normalized, "none", True)
        assert abs(plain - want) > 1e-3


def tiny_dinov3(**gram) -> DINOv3:
    """TINY_METHODS' DINOv3 on TINY_MODEL's ViT, with these Gram settings."""
    cfg = DINOv3Config(**TINY_METHODS["dinov3"] | {"gram": GramConfig(**gram)})
    method = build_method(tiny(Path("unused"), cfg))
    method.set_schedule(10, 5)
    return method


def crops(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    return out + [torch.randn(4, 3, 16, 16, generator=g) for _ in range(3)]


def test_total_is_the_sum_of_the_weighted_parts_and_the_gram_term_is_the_students():
    method = tiny_dinov3(loss_weight=0.7, it_first_update=0)
    with torch.no_grad():  # a Gram teacher that differs from the student
        for p in method.gram_teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    c, batch = method.cfg, {"crops": crops()}
    torch.manual_seed(1)
    out = method.training_step(batch)
    parts = (
        c.dino_loss_weight * out["dino_loss"]
        + c.ibot_loss_weight * out["ibot_loss"]
        + c.koleo_loss_weight * out["koleo_loss"]
    )
    assert out["gram_loss"].item() > 1e-3
    assert abs(out["loss"].item() - (parts + 0.7 * out["gram_loss"]).item()) <= 1e-5
    # the Gram term: the masked student's patch tokens against the Gram teacher's, recomputed
    torch.manual_seed(1)
    globals_ = torch.cat(batch["crops"][:2])
    masks, _, _ = ibot_masks(8, (4, 4), c.mask_ratio_min_max, c.mask_sample_probability)
    with torch.no_grad():
        s = method.backbone(globals_, mask=masks, mask_token=method.mask_token)
        t = method.gram_teacher(globals_)
    want = reference(s.tokens[:, s.num_prefix :], t.tokens[:, t.num_prefix :], True, "none", False)
    assert abs(out["gram_loss"].item() - want) <= 1e-5
    # inactive (before the Gram teacher is loaded): the term weighs 0, still logged
    method.gram_active.fill_(0.0)
    torch.manual_seed(1)
    off = method.training_step(batch)
    assert abs(off["loss"].item() - parts.item()) <= 1e-5
    assert abs(off["loss"].item() - out["loss"].item()) > 1e-3


def test_gram_teacher_sees_the_twins_its_features_resized_to_the_students_grid():
    """gram.teacher_size 64: the last 2 crops (the globals' twins, 64 px: an 8 x 8 grid) go to
    the Gram teacher alone, its patch features resized to the student's 4 x 4 grid as the
    official get_gram_teacher_output does (channels first, bicubic, align_corners False, no
    antialiasing); the DINO, iBOT and KoLeo terms are those of the same crops without twins."""
    method = tiny_dinov3(it_first_update=0, teacher_size=64)
    assert method.twins == 2
    with torch.no_grad():
        for p in method.gram_teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    c, views = method.cfg, crops()
    g = torch.Generator().manual_seed(5)
    twins = [torch.randn(4, 3, 64, 64, generator=g) for _ in range(2)]
    torch.manual_seed(1)
    out = method.training_step({"crops": views + twins})
    torch.manual_seed(1)
    masks, _, _ = ibot_masks(8, (4, 4), c.mask_ratio_min_max, c.mask_sample_probability)
    with torch.no_grad():
        s = method.backbone(torch.cat(views[:2]), mask=masks, mask_token=method.mask_token)
        t = method.gram_teacher(torch.cat(twins)).tokens[:, -64:]  # (8, 64, D): 8 x 8 patches
        hw = t.transpose(-2, -1).unflatten(-1, (8, 8))
        small = F.interpolate(hw, size=(4, 4), mode="bicubic", align_corners=False, antialias=False)
        t = small.flatten(-2, -1).transpose(-2, -1)
    want = reference(s.tokens[:, s.num_prefix :], t, True, "none", False)
    assert abs(out["gram_loss"].item() - want) <= 1e-5
    method.twins = 0  # the same crops without twins: the student's terms unchanged
    torch.manual_seed(1)
    plain = method.training_step({"crops": views})
    for term in ("dino_loss", "ibot_loss", "koleo_loss"):
        assert out[term].item() == plain[term].item(), term
    assert abs(plain["gram_loss"].item() - out["gram_loss"].item()) > 1e-4


def states(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gram_teacher_taken_from_the_ema_teacher_then_refreshed_every_update_frequency():
    """it_load_ema_teacher 2, it_first_update 3, update_frequency 2: copied before iteration 2,
    refreshed before 4 and 6, unchanged in between while the EMA teacher moves; the loss active
    from 2, when the Gram teacher is there (the official loss runs from the start of a run that
    has one; it_first_update governs the refreshes alone). max_updates caps the refreshes, as
    the official train.py counts them (after iterations it + 1 >= it_first_update, multiples of
    update_frequency, while fewer than max_updates were made)."""
    method = tiny_dinov3(it_load_ema_teacher=2, it_first_update=3, update_frequency=2)
    first = states(method.gram_teacher)
    copied = {2: True, 4: True, 6: True}
    kept = first
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        with torch.no_grad():  # the student moves: the EMA teacher moves with it
            for p in method.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g))
        method.after_optimizer_step(step, 10)
        it = step + 1
        gram, teacher = states(method.gram_teacher), states(method.teacher.backbone)
        if copied.get(it):
            assert same(gram, teacher), it
            kept = gram
        else:
            assert same(gram, kept) and not same(gram, teacher), it
        assert method.gram_active.item() == float(it >= 2), it
    assert not same(kept, first)
    assert [method.gram_event(i) for i in range(7)] == [
        None, None, "load", None, "update", None, "update"
    ]  # fmt: skip
    later = tiny_dinov3(it_load_ema_teacher=0, it_first_update=5, update_frequency=2)
    assert [later.gram_event(i) for i in range(9)] == ["load"] + [None] * 5 + [
        "update", None, "update"
    ]  # fmt: skip
    capped = tiny_dinov3(it_first_update=3, update_frequency=2, max_updates=2)
    events = [capped.gram_event(i) for i in range(11)]
    assert [i for i, e in enumerate(events) if e == "update"] == [4, 6]


def test_gram_teacher_gets_no_gradient_and_is_not_optimised():
    method = tiny_dinov3(it_first_update=0)
    gram = {id(p) for p in method.gram_teacher.parameters()}
    assert gram and not any(p.requires_grad for p in method.gram_teacher.parameters())
    optimised = {id(p) for group in method.param_groups(0.04) for p in group["params"]}
    assert not gram & optimised
    keys = method.state_dict().keys()
    assert "gram_active" in keys and any(k.startswith("gram_teacher.") for k in keys)
    with torch.no_grad():  # else the unmasked student equals it: a zero loss and gradient
        for p in method.gram_teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(0)
    views = crops()
    out = method.backbone(torch.cat(views[:2]))
    ((_, value),) = method.extra_losses(views, out).values()
    value.backward()
    assert all(p.grad is None for p in method.gram_teacher.parameters())
    grads = [p.grad for p in method.backbone.blocks.parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) > 0  # the student's term


def test_tiny_dinov3_run_resumes_bit_identically_with_the_gram_loss_active(tmp_path):
    """TINY_METHODS' Gram schedule: copied before iteration 1, the loss from 1, refreshed before
    2 and 4; the Gram teacher on 48-px twins of the 32-px global crops. 4 steps straight against
    2 then a resume to 4: the same parameters (Gram teacher and gram_active included) and logged
    losses; the Gram loss in the total on both sides."""
    schedule = dict(epochs=10, save_every_steps=2, keep_last=10)
    gram = GramConfig(it_load_ema_teacher=1, it_first_update=1, update_frequency=2, teacher_size=48)

    def run(name: str, **train) -> None:
        cfg = tiny(tmp_path / name, "dinov3", model=DINOV3_MODEL, **schedule | train)
        cfg.method.gram = gram
        fit(cfg)

    run("straight", max_steps=4)
    run("stopped", max_steps=2)
    run("stopped", max_steps=4, resume="auto")
    rows = metrics(tmp_path / "straight")
    losses = [m["loss"] for m in rows]
    assert len(losses) == 4 and all(map(math.isfinite, losses))
    a, b = params(tmp_path / "straight", 4), params(tmp_path / "stopped", 4)
    assert a.keys() == b.keys() and any(k.startswith("gram_teacher.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed parameters differ"
    resumed = {m["step"]: m for m in metrics(tmp_path / "stopped")}
    assert [resumed[s]["loss"] for s in (3, 4)] == losses[2:]
    assert [resumed[s]["gram_loss"] for s in (3, 4)] == [m["gram_loss"] for m in rows[2:]]
    assert all(m["gram_loss"] > 0 for m in rows[1:])
    at_stop = params(tmp_path / "stopped", 2)
    assert at_stop["gram_active"].item() == 1.0
    teacher = {
        k[len("teacher.backbone.") :]: v
        for k, v in at_stop.items()
        if k.startswith("teacher.backbone.")
    }
    gram = {
        k[len("gram_teacher.") :]: v for k, v in at_stop.items() if k.startswith("gram_teacher.")
    }
    assert same(gram, teacher)  # refreshed before iteration 2


def test_gram_teacher_from_a_checkpoint_and_at_model_init(tmp_path):
    """gram.ckpt: that run's teacher backbone, never replaced by the EMA teacher's load;
    model.init without gram.ckpt: the checkpoint's backbone for the Gram teacher too."""
    run = tmp_path / "run"
    fit(tiny(run, "dinov3", max_steps=1))
    saved = params(run, 1)
    want = {
        k[len("teacher.backbone.") :]: v
        for k, v in saved.items()
        if k.startswith("teacher.backbone.")
    }
    method = tiny_dinov3(ckpt=str(run), it_load_ema_teacher=0)
    assert same(states(method.gram_teacher), want)
    assert not same(states(method.teacher.backbone), want)
    assert method.gram_event(0) is None and method.gram_event(50000) == "update"
    fresh = tiny_dinov3()
    assert "Gram teacher" in fresh.init_from(str(run))
    assert same(states(fresh.gram_teacher), want)


def test_gram_settings_are_checked_by_name():
    cfg = tiny(Path("unused"), "dinov3")
    cfg.method.gram = GramConfig(loss_weight=-1.0, update_frequency=0)
    errors = cfg.method.errors(cfg)
    assert any(e.startswith("method.gram.loss_weight: must be >= 0") for e in errors)
    assert any(e.startswith("method.gram.update_frequency: must be >= 1") for e in errors)


# --- the high-resolution adaptation: a choice of crop sizes per training step -----------------

RATIOS = (0.5, 0.3, 0.2)


def test_mixed_sizes_one_choice_per_step_shared_by_every_process():
    """MixedSizes over 2 processes taking batches of 4 in turn (Accelerate's round-robin): each
    index once per epoch, and every batch of one step, on both processes, carries that step's
    size_choice; the choices follow the ratios (4 standard errors over 4,000 steps)."""
    n, processes, batch = 40, 2, 4
    sampler = MixedSizes(n, processes, batch, RATIOS, seed=3)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = [divmod(i, n) for i in sampler]
        assert sorted(i for _, i in order) == list(range(n))
        for position, (k, _) in enumerate(order):
            step = position // batch // processes
            assert k == size_choice(3, epoch, step, RATIOS)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    drawn = torch.tensor([size_choice(0, 0, s, RATIOS) for s in range(4000)])
    for k, r in enumerate(RATIOS):
        share = (drawn == k).float().mean().item()
        assert abs(share - r) <= 4 * math.sqrt(r * (1 - r) / 4000), (k, share)


def mixed(run: Path, **train) -> Config:
    """A tiny DINOv3 run on a DINOv3 backbone whose steps draw global / local / Gram-teacher
    crops of 32 / 16 / 48 or 48 / 24 / 64 px, half and half; Gram anchoring from step 1."""
    cfg = tiny(run, "dinov3", model=DINOV3_MODEL, **dict(epochs=10, keep_last=10) | train)
    cfg.method.mixed_sizes, cfg.method.mixed_local_sizes = (32, 48), (16, 24)
    cfg.method.mixed_teacher_sizes, cfg.method.mixed_ratios = (48, 64), (0.5, 0.5)
    return cfg


def test_each_batch_has_the_sizes_its_step_drew(tmp_path):
    """The training loader of a mixed run: batch j of epoch 1 holds 2 globals, the locals and 2
    twins of the sizes of size_choice(seed, 1, j), both choices present."""
    cfg = mixed(tmp_path / "run")
    prepare(cfg)
    dataset, loader, _ = build_data(cfg, TRAINABLE["dinov3"], Accelerator(cpu=True))
    loader.sampler.set_epoch(1)  # as the prepared loader does
    dataset.set_epoch(1)
    seen = set()
    for j, batch in enumerate(loader):
        k = size_choice(cfg.train.seed, 1, j, (0.5, 0.5))
        sizes = [c.shape[-1] for c in batch["crops"]]
        g, local, twin = [(32, 16, 48), (48, 24, 64)][k]
        assert sizes == [g, g, *[local] * cfg.method.local_crops, twin, twin], j
        seen.add(k)
    assert seen == {0, 1}


def test_a_mixed_run_resumes_bit_identically(tmp_path):
    """Mixed sizes, 6 steps straight against 3 then a resume to 6: the same parameters and
    logged losses (the choices are keyed by seed, epoch and step, not drawn from a state)."""
    fit(mixed(tmp_path / "straight", max_steps=6, save_every_steps=3))
    fit(mixed(tmp_path / "stopped", max_steps=3, save_every_steps=3))
    fit(mixed(tmp_path / "stopped", max_steps=6, save_every_steps=3, resume="auto"))
    a, b = params(tmp_path / "straight", 6), params(tmp_path / "stopped", 6)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed parameters differ"
    losses = [m["loss"] for m in metrics(tmp_path / "straight")]
    resumed = {m["step"]: m["loss"] for m in metrics(tmp_path / "stopped")}
    assert [resumed[s] for s in (4, 5, 6)] == losses[3:] and all(map(math.isfinite, losses))


def test_mixed_settings_are_checked_by_name():
    cfg = mixed(Path("unused"))
    cfg.method.mixed_local_sizes, cfg.method.mixed_ratios = (16,), (0.5, -1.0)
    cfg.data.decode_on_device = True
    errors = "\n".join(cfg.method.errors(cfg))
    assert "method.mixed_local_sizes: one per method.mixed_sizes (2), got 1" in errors
    assert "method.mixed_ratios: each > 0" in errors
    assert "not with data.streaming or data.decode_on_device" in errors


def test_dinov3_recipes_validate_and_the_adaptation_draws_the_official_sizes(monkeypatch):
    """recipes/dinov3_vits16.py and _high_res.py are valid configs; the latter's choices are
    the official adaptation's (global, local, Gram-teacher) sides, each global crop with its
    twin, at its probabilities."""
    import importlib.util

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    monkeypatch.syspath_prepend(str(recipes))  # as run: each builds on the one before

    def config(name: str) -> Config:
        spec = importlib.util.spec_from_file_location(name, recipes / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return validate(module.config())

    assert config("dinov3_vits16").method.name == "dinov3"
    cfg = config("dinov3_vits16_high_res")
    sizes = []
    for k in range(5):
        first, *_, last = dino_crops(cfg, k)
        sizes.append((first.size, last.size, first.twin))
    want = [(512, 112, 768), (768, 112, 1152), (768, 168, 1152), (768, 224, 1152)]
    assert sizes == want + [(768, 336, 1152)]
    assert cfg.method.mixed_ratios == (0.3, 0.3, 0.3, 0.05, 0.05)
    assert isinstance(dino_view(cfg), ViewChoice) and len(dino_view(cfg).views) == 5
