"""Segmentation fine-tuning (`ssl-vit segfinetune`): EoMT's Hungarian matching, point losses,
mask annealing, masked attention and semantic inference against hand-computed cases and the
official definitions (re-implemented here); the layer-wise lr decay and two-stage warmup of the
official schedule; both heads learn synthetic segmentation end to end; a stopped run resumes
bit-identically."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import metrics, params, synthetic_frequency_baseline, tiny

from ssl_vit.backbone import Backbone
from ssl_vit.cli import main as cli_main
from ssl_vit.eval.segfinetune import (
    EoMT,
    MaskLoss,
    SegFineTune,
    SegFineTuneConfig,
    annealing,
    pairwise_bce,
    pairwise_dice,
    point_losses,
    segfinetune_config,
    semantic_scores,
    semantic_targets,
    uncertain_points,
)
from ssl_vit.train.loop import fit
from ssl_vit.weights import export_backbone

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)


def backbone(seed: int = 0, **kw) -> Backbone:
    torch.manual_seed(seed)
    return Backbone("vit_tiny_patch16_224", **(TINY | kw))


def small(**kw) -> SegFineTuneConfig:
    """3 classes, 4 queries on the last 2 blocks (annealed over steps 0-4 and 4-8), 8 points."""
    base = dict(num_classes=3, num_queries=4, num_blocks=2, num_points=8)
    return SegFineTuneConfig(**base | dict(anneal_start=(0, 4), anneal_end=(4, 8)) | kw)


def criterion(k: int = 3, points: int = 16) -> MaskLoss:
    return MaskLoss(k, points, 3.0, 0.75, 0.1, 2.0, 5.0, 5.0)


# --- matching and losses ----------------------------------------------------------------------


def test_pairwise_costs_on_hand_values():
    """Two points. Query logits (0, 0): BCE log 2 whatever the target; dice with p = (1/2, 1/2)
    and target (1, 0): 1 - (2 x 1/2 + 1) / (1 + 1 + 1) = 1/3. Query logits (ln 3, -ln 3):
    p = (3/4, 1/4); against (1, 0) BCE = -log(3/4), dice = 1 - (3/2 + 1) / (1 + 1 + 1) = 1/6."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3), -math.log(3)]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    bce = pairwise_bce(logits, targets)
    assert bce[0].tolist() == pytest.approx([math.log(2)] * 2)
    assert bce[1, 0].item() == pytest.approx(-math.log(0.75))
    assert bce[1, 1].item() == pytest.approx((-math.log(0.25) - math.log(0.75)) / 2)
    dice = pairwise_dice(logits, targets)
    assert dice[:, 0].tolist() == pytest.approx([1 / 3, 1 / 6])
    assert dice[:, 1].tolist() == pytest.approx([1 - 1 / 2, 1 - 1 / 2])  # 1 - 1 / (1 + 0 + 1)


def test_hungarian_matching_picks_the_cheapest_assignment_not_the_greedy_one():
    """All mask logits 0 and empty targets: BCE log 2 and dice 1 - 1 / (P / 2 + 1) at any
    points, the same for every pair, so the class costs decide. Query 0 is the best for both
    classes (0.5, 0.45): greedy takes class a for it and leaves query 1 a poor b (0.05, total
    0.55); the optimum gives query 0 class b and query 1 class a (0.45 + 0.45 = 0.9)."""
    p = 16
    probs = torch.tensor(
        [[0.5, 0.45, 0.03, 0.02], [0.45, 0.05, 0.3, 0.2], [0.1, 0.1, 0.4, 0.4]]
    )  # classes a = 0, b = 1, 2, no object
    class_logits = probs.log()
    labels = torch.tensor([0, 1])
    rows, cols, cost = criterion(3, p).match(
        torch.zeros(3, 4, 4), class_logits, torch.zeros(2, 8, 8), labels
    )
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 1: 0}
    mask_cost = 5 * math.log(2) + 5 * (1 - 1 / (p / 2 + 1))
    assert cost[0, 1].item() == pytest.approx(-2 * 0.45 + mask_cost, rel=1e-5)
    assert cost[1, 0].item() == pytest.approx(-2 * 0.45 + mask_cost, rel=1e-5)
    assert cost[0, 0].item() == pytest.approx(-2 * 0.5 + mask_cost, rel=1e-5)
    assert cost[2].tolist() == pytest.approx([-0.2 + mask_cost] * 2, rel=1e-5)


def official_point_losses(logits, labels, num_masks):
    """Mask2Former's point losses in our own words: per mask the mean over its points of the
    binary cross-entropy of sigmoid(logit) against the label, and 1 - (2 sum p t + 1) /
    (sum p + sum t + 1); each summed over the masks and divided by the number of masks."""
    p = torch.sigmoid(logits)
    bce = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean(dim=1)
    dice = 1 - (2 * (p * labels).sum(1) + 1) / (p.sum(1) + labels.sum(1) + 1)
    return bce.sum() / num_masks, dice.sum() / num_masks


def test_point_losses_on_a_hand_case_and_against_the_official_formula():
    # one mask, two points: logits (ln 3, -ln 3) against (1, 0) -> BCE -log(3/4), dice 1/6
    logits = torch.tensor([[math.log(3), -math.log(3)]])
    bce, dice = point_losses(logits, torch.tensor([[1.0, 0.0]]), torch.tensor(1.0))
    assert bce.item() == pytest.approx(-math.log(0.75)) and dice.item() == pytest.approx(1 / 6)
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 40, generator=g)
    labels = torch.rand(5, 40, generator=g).round()
    got = point_losses(logits, labels, torch.tensor(2.5))
    want = official_point_losses(logits, labels, 2.5)
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-5)
    assert got[1].item() == pytest.approx(want[1].item(), rel=1e-5)


def test_importance_sampling_takes_the_most_uncertain_points():
    """Logits 0 on the left half and 10 on the right: 75 % of the points (the most uncertain of
    3x as many candidates) fall where |logit| is smallest, the left half; the rest uniform."""
    logits = torch.full((2, 8, 8), 10.0)
    logits[:, :, :4] = 0.0
    torch.manual_seed(0)
    points = uncertain_points(logits, 400, 3.0, 0.75)
    assert points.shape == (2, 400, 2)
    assert (points[:, :300, 0] < 0.5).all()  # x of the importance-sampled points: left half
    right = (points[:, 300:, 0] >= 0.5).float().mean()
    assert 0.35 < right < 0.65  # the uniform rest


def test_semantic_targets_one_mask_per_class_present_ignored_pixels_in_none():
    masks = torch.tensor([[[0, 3], [255, 3]], [[255, 255], [255, 255]]])
    (m0, l0), (m1, l1) = semantic_targets(masks)
    assert l0.tolist() == [0, 3] and m0.tolist() == [[[1, 0], [0, 0]], [[0, 1], [0, 1]]]
    assert len(l1) == 0 and m1.shape == (0, 2, 2)


def test_the_loss_sums_weighted_terms_of_every_prediction_and_handles_no_labels():
    method = SegFineTune(backbone(), small())
    masks = torch.randint(0, 3, (2, 32, 32))
    masks[1] = 255  # an image without a labelled pixel: its queries all "no object"
    out = method.training_step({"images": torch.randn(2, 3, 32, 32), "masks": masks})
    assert out["loss"].requires_grad and math.isfinite(out["loss"].item())
    assert set(out) == {"loss", "loss_ce", "loss_mask", "loss_dice"}
    with pytest.raises(ValueError, match="method.num_blocks"):  # more than the depth, 3
        SegFineTune(backbone(), small(num_blocks=4))


# --- annealing and masked attention ------------------------------------------------------------


def test_mask_annealing_per_block_follows_the_official_schedule():
    """The official DINOv2 ADE20K config: block j anneals from start_j to end_j, poly 0.9."""
    cfg = SegFineTuneConfig()
    starts, ends = cfg.anneal_start, cfg.anneal_end
    assert starts == (6520, 13040, 19560, 26080) and ends == (13040, 19560, 26080, 32600)

    def probs(step):
        return [annealing(step, s, e, 0.9) for s, e in zip(starts, ends, strict=True)]

    assert probs(0) == [1.0] * 4
    assert probs(6520) == [1.0] * 4  # (1 - 0)^0.9
    assert probs(9780) == pytest.approx([0.5**0.9, 1, 1, 1])  # block 0 half way
    assert probs(13040) == pytest.approx([0, 1, 1, 1])
    assert probs(24450) == pytest.approx([0, 0, 0.25**0.9, 1])  # 3/4 through block 2's
    assert probs(32600) == [0.0] * 4
    # the method sets the next step's probabilities after each optimizer step
    method = SegFineTune(
        backbone(depth=4), SegFineTuneConfig(num_classes=3, num_queries=4, num_points=8)
    )
    method.after_optimizer_step(9779, 40_000)
    assert method.head.mask_prob.tolist() == pytest.approx(probs(9780))


def attention_case(prob: float):
    """A tiny EoMT (1 query block) and the last block's inputs: 2 queries after the cls token,
    then 16 patches; query 0's mask logits positive on the left half of the grid only."""
    bb = backbone(depth=2).eval()
    eomt = EoMT(32, 8, 3, 2, 1).eval()
    seq = bb.embed(torch.randn(1, 3, 32, 32))
    seq = bb.add_prefix(seq, seq.x, torch.randn(1, 2, 32))
    logits = torch.full((1, 2, 8, 8), -5.0)  # upscaled 2x: 8 x 8 for a 4 x 4 grid
    logits[0, 0, :, :4] = 5.0
    logits[0, 1] = 5.0  # query 1 sees everything
    mask = eomt.attention_mask(logits, prob, bb.num_prefix_tokens, seq.grid, seq.x.shape[1])
    return bb, seq, mask


def test_a_masked_query_attends_only_inside_its_mask():
    """Perturbing a patch outside query 0's mask (right half) leaves query 0's output of the
    masked block unchanged; a patch inside changes it; query 1 (no mask) sees both."""
    bb, seq, mask = attention_case(prob=1.0)
    start = seq.num_prefix  # the cls token, queries at 1, 2; patches from 3, row-major
    assert mask.shape == (1, 1, 19, 19) and mask[0, 0, 1, 3:].view(4, 4)[:, :2].all()
    assert not mask[0, 0, 1, 3:].view(4, 4)[:, 2:].any() and mask[0, 0, 2:].all()
    with torch.no_grad():
        out = bb.run_block(1, seq.x, seq, mask)
        outside, inside = seq.x.clone(), seq.x.clone()
        kick = 3 * torch.randn(32)  # not a constant: the block's LayerNorm would remove it
        outside[:, start + 3] += kick  # patch (0, 3): right half
        inside[:, start + 0] += kick  # patch (0, 0): left half
        out_outside = bb.run_block(1, outside, seq, mask)
        out_inside = bb.run_block(1, inside, seq, mask)
    assert torch.allclose(out_outside[:, 1], out[:, 1], atol=1e-6)
    assert not torch.allclose(out_inside[:, 1], out[:, 1], atol=1e-3)
    assert not torch.allclose(out_outside[:, 2], out[:, 2], atol=1e-3)


def test_an_annealed_away_mask_is_not_applied():
    """Probability 0: every query row unmasked, query 0 sees the right half again."""
    _, _, mask = attention_case(prob=0.0)
    assert mask.all()


def test_forward_masks_each_query_block_with_the_prediction_before_it():
    """The attention mask the query block receives is the one built from the intermediate
    prediction (its logits > 0 at the patch grid)."""
    method = SegFineTune(backbone(), small(num_blocks=1)).eval()
    seen = []
    method.backbone.blocks[2].register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("attn_mask")), with_kwargs=True
    )
    with torch.no_grad():
        preds = method.predictions(torch.randn(1, 3, 32, 32))
    assert len(preds) == 2 and seen[0] is not None
    inside = F.interpolate(preds[0][0], (4, 4), mode="bilinear") > 0
    assert torch.equal(seen[0][0, 0, 1:5, 5:], inside.flatten(2)[0])
    method.head.mask_prob.zero_()  # annealed away: in evaluation no mask, no intermediate
    seen.clear()
    with torch.no_grad():
        assert len(method.predictions(torch.randn(1, 3, 32, 32))) == 1
    assert seen == [None]


# --- inference ----------------------------------------------------------------------------------


def test_semantic_inference_sums_class_probabilities_times_masks():
    """2 queries, 2 classes + no object. Query 0: softmax (3/5, 1/5, 1/5), mask on the left
    pixel only (sigmoid 1 / 0); query 1: (1/5, 1/5, 3/5) mostly no object, mask everywhere
    at sigmoid(0) = 1/2. Left pixel: class 0 = 3/5 + 1/10, class 1 = 1/5 + 1/10; right pixel:
    1/10 and 1/10."""
    class_logits = torch.tensor([[[math.log(3), 0.0, 0.0], [0.0, 0.0, math.log(3)]]])
    mask_logits = torch.tensor([[[[100.0, -100.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    out = semantic_scores(mask_logits, class_logits, (1, 2))
    assert out.shape == (1, 2, 1, 2)
    assert out[0, :, 0, 0].tolist() == pytest.approx([0.7, 0.3])
    assert out[0, :, 0, 1].tolist() == pytest.approx([0.1, 0.1])


def test_prediction_slides_over_windows_of_the_crop():
    method = SegFineTune(backbone(), small()).eval()
    x = torch.randn(1, 3, 32, 48)
    calls = []
    fn = method.logits
    method.logits = lambda t: calls.append(t.shape[-2:]) or fn(t)
    out = method.predict(x)
    assert out.shape == (1, 3, 32, 48) and [tuple(c) for c in calls] == [(32, 32)] * 2
    assert ((out >= 0) & (out <= 4)).all()  # sums over 4 queries of products of probabilities


# --- optimisation --------------------------------------------------------------------------------


def test_layer_decay_groups_follow_the_official_rule():
    """EoMT's configure_optimizers with llrd 0.8 on 3 blocks: block i x 0.8^(2 - i), patch
    embedding, cls token and position embedding x 0.8^2 (as block 0), the final norm and the
    heads x 1; every parameter weight-decayed; backbone parameters flagged for the late warmup."""
    method = SegFineTune(backbone(), small())
    groups = method.param_groups(0.05)
    of = {id(p): g for g in groups for p in g["params"]}
    named = dict(method.named_parameters())
    assert len(of) == len(named)

    def scale(name):
        return of[id(named[name])]["lr_scale"]

    for i in range(3):
        assert scale(f"backbone.blocks.{i}.attn.qkv.weight") == pytest.approx(0.8 ** (2 - i))
        assert scale(f"backbone.blocks.{i}.norm1.bias") == pytest.approx(0.8 ** (2 - i))
    for name in ("backbone.patch_embed.proj.weight", "backbone.cls_token", "backbone.pos_embed"):
        assert scale(name) == pytest.approx(0.64)
    for name in ("backbone.norm.weight", "head.queries.weight", "head.class_head.bias"):
        assert scale(name) == 1.0
    assert all(g["wd_scale"] == 1.0 for g in groups)
    assert all(g["backbone"] == name.startswith("backbone.") for name, p in named.items()
               for g in [of[id(p)]])  # fmt: skip


def test_two_stage_warmup_and_poly_schedule_as_the_official_one():
    """TwoStageWarmupPolySchedule with warmup (500, 1000), poly 0.9, 10,000 steps: the head
    linear from 0 to the peak over 500 steps then poly over 9,500; the backbone 0 for 500 steps,
    linear over 1,000, then poly over 8,500."""
    method = SegFineTune(backbone(), small())
    peak, total = 1e-4, 10_000
    head = {"lr_scale": 1.0, "backbone": False}
    vit = {"lr_scale": 0.5, "backbone": True}

    def lr(group, step):
        return method.group_lr(
            group, method.lr_at(step, total, 0, peak, 0.0), step, total, peak, 0.0
        )

    assert lr(head, 0) == 0.0 and lr(head, 250) == pytest.approx(0.5e-4)
    assert lr(head, 500) == pytest.approx(1e-4)
    assert lr(head, 5250) == pytest.approx(1e-4 * 0.5**0.9)
    assert [lr(vit, s) for s in (0, 499, 500)] == [0.0, 0.0, 0.0]
    assert lr(vit, 1000) == pytest.approx(0.5 * 0.5e-4)
    assert lr(vit, 1500) == pytest.approx(0.5 * 1e-4)
    assert lr(vit, 5750) == pytest.approx(0.5 * 1e-4 * 0.5**0.9)
    assert lr(vit, total) == 0.0


def test_official_defaults():
    cfg = segfinetune_config()
    t, m = cfg.train, cfg.method
    assert (t.lr, t.weight_decay, t.batch_size, t.epochs, t.clip_grad) == (1e-4, 0.05, 16, 31, 0.01)
    assert (m.head, m.num_queries, m.num_blocks, m.layer_decay, m.poly_power) == (
        "eomt",
        100,
        4,
        0.8,
        0.9,
    )
    assert (m.num_points, m.oversample_ratio, m.importance_ratio) == (12544, 3.0, 0.75)
    assert (m.class_weight, m.mask_weight, m.dice_weight, m.no_object_weight) == (2, 5, 5, 0.1)
    assert m.warmup_iters == (500, 1000) and cfg.model.img_size == 512
    method = SegFineTune(
        backbone(patch_size=16, img_size=64, depth=4), SegFineTuneConfig(num_classes=150)
    )
    assert len(method.head.upscale) == 2  # 16 px patches: log2(16) - 2 x2 blocks, 4x
    assert method.head.class_head.out_features == 151


# --- end to end --------------------------------------------------------------------------------


EOMT_SMALL = ["--method.num_queries", "16", "--method.num_blocks", "1", "--method.num_points"]
EOMT_SMALL += ["256", "--method.anneal_start", "50", "--method.anneal_end", "150"]


@pytest.mark.parametrize(
    "head, lr, factor, extra",
    [("linear", "3e-3", 1.5, []), ("eomt", "1e-2", 2.5, EOMT_SMALL)],
)
def test_segfinetune_learns_synthetic_segmentation_end_to_end(
    head, lr, factor, extra, tmp_path, capsys
):
    """`ssl-vit segfinetune` on a random ViT (4 px patches: an 8 x 8 grid at 32 px), 300 steps,
    no layer decay or clipping: held-out mIoU a multiple of the frequency baseline (6.3 %). Seen:
    linear 11.3 (lr 3e-3; 10.2 at 1e-2, 200 steps), EoMT 24.0 (16 queries on the last block,
    masks annealed over steps 50-150; 12.9 after 200 steps)."""
    torch.manual_seed(0)
    bb = Backbone("vit_tiny_patch16_224", **TINY | dict(patch_size=4, depth=2))
    export_backbone(bb, tmp_path / "bb")
    args = ["--data.path", "synthetic", "--data.synthetic_size", "200", "--data.num_workers", "0"]
    args += ["--model.img_size", "32", "--train.batch_size", "8", "--train.effective_batch", "8"]
    args += ["--train.steps", "300", "--train.lr", lr, "--train.clip_grad", "0"]
    args += ["--method.warmup_iters", "10,10", "--method.layer_decay", "1"]
    args += ["--train.log_every", "100", "--method.head", head, *extra]
    argv = ["segfinetune", "--checkpoint", str(tmp_path / "bb"), *args]
    assert cli_main([*argv, "--train.output_dir", str(tmp_path / "run")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 300 and result["eval_split"] == "val" and result["held_out"]
    baseline = synthetic_frequency_baseline()
    assert 5 < baseline < 8
    assert result["val_miou"] > factor * baseline, (result, baseline)
    assert (tmp_path / "run" / "segmentation_val.csv").is_file()
    assert (tmp_path / "run" / "segmentation_val.png").is_file()


def test_a_stopped_run_resumes_bit_identically(tmp_path):
    """EoMT with its mask annealing under way across the stop (block probability falling over
    steps 2-8): 6 steps straight against 3, then `train.resume auto` to 6: the same parameters
    and mask probabilities, the same logged losses."""
    bb = backbone(depth=2)
    export_backbone(bb, tmp_path / "bb")
    schedule = dict(epochs=2, save_every_steps=3, keep_last=10, warmup_epochs=0, base_lr=1e-3)

    def cfg(run, **kw):
        c = tiny(tmp_path / run, "segfinetune", **schedule, **kw)
        c.method.checkpoint = str(tmp_path / "bb")
        return c

    fit(cfg("straight", max_steps=6))
    fit(cfg("stopped", max_steps=3))
    fit(cfg("stopped", max_steps=6, resume="auto"))
    a, b = params(tmp_path / "straight", 6), params(tmp_path / "stopped", 6)
    assert a.keys() == b.keys() and "head.mask_prob" in a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert a["head.mask_prob"].item() == pytest.approx(annealing(6, 2, 8, 0.9))
    straight = [m["loss"] for m in metrics(tmp_path / "straight")]
    resumed = {m["step"]: m["loss"] for m in metrics(tmp_path / "stopped")}
    assert len(straight) == 6 and [resumed[s] for s in (4, 5, 6)] == straight[3:]


@pytest.mark.skipif(
    not timm.is_model("vit_small_patch16_dinov3_qkvb"), reason="timm without DINOv3 models"
)
def test_eomt_on_a_rotary_backbone_with_registers():
    """timm's RoPE Eva (cls + 4 registers): the queries join after the 5 prefix tokens, their
    rows of the attention mask are theirs, and the loss backpropagates."""
    torch.manual_seed(0)
    bb = Backbone("vit_small_patch16_dinov3_qkvb", img_size=64, embed_dim=64, depth=2, num_heads=2)
    method = SegFineTune(bb, small(num_blocks=1))
    seen = []
    bb.blocks[1].register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0].shape, k["attn_mask"], k["rope"].shape)),
        with_kwargs=True,
    )
    masks = torch.randint(0, 3, (2, 64, 64))
    out = method.training_step({"images": torch.randn(2, 3, 64, 64), "masks": masks})
    out["loss"].backward()
    ((shape, mask, rope),) = seen
    assert shape == (2, 5 + 4 + 16, 64) and mask.shape == (2, 1, 25, 25)
    assert rope[-2] == 4 + 16  # rotated: the queries (identity rows) and the patches
    assert mask[:, 0, :5].all() and mask[:, 0, 9:].all()  # prefix and patch rows see all
    assert method.head.queries.weight.grad is not None
