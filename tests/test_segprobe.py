"""Segmentation probe: mIoU / mean accuracy / pixel accuracy against hand-computed cases and
mmsegmentation's definition (re-implemented here), sliding-window = whole-image inference,
patch logits upsampled onto their own pixels, the head and schedule of DINOv3's protocol, and
`ssl-vit segprobe` end to end: it learns, and writes its table and picture."""

from __future__ import annotations

import contextlib
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_frequency_baseline
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssl_vit.backbone import Backbone
from ssl_vit.cli import main as cli_main
from ssl_vit.data import SYNTHETIC_CLASSES
from ssl_vit.eval.pretrained import from_checkpoint, pretrained_backbone
from ssl_vit.eval.segmentation import Inference, confusion, scores, slide, upsample, whole
from ssl_vit.eval.segmentation_eval import segmentation_metrics
from ssl_vit.eval.segprobe import SegProbe, SegProbeConfig, segprobe_config, token_map
from ssl_vit.weights import export_backbone

IGNORE = 255
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def backbone(seed: int = 0, **kw) -> Backbone:
    torch.manual_seed(seed)
    return Backbone("vit_tiny_patch16_224", **(TINY | kw))


def score(pred, label, k):
    return scores(confusion(torch.tensor(pred), torch.tensor(label), k))


# --- metrics ----------------------------------------------------------------------------------


def test_hand_computed_case_with_an_absent_class_and_an_ignored_pixel():
    """Class 2 is in neither labels nor predictions: left out of both means (with it as 0 the
    mIoU would be 4/9); the ignored pixel (predicted 0) counts nowhere."""
    label = [[0, 0, 1], [1, IGNORE, 0]]
    pred = [[0, 1, 1], [1, 0, 0]]
    s = score(pred, label, 3)
    # class 0: intersection 2, label 3, predicted 2, union 3; class 1: 2, 2, 3, union 3
    assert s["iou"][:2] == pytest.approx([2 / 3, 2 / 3]) and math.isnan(s["iou"][2])
    assert s["acc"][:2] == pytest.approx([2 / 3, 1.0]) and math.isnan(s["acc"][2])
    assert s["miou"] == pytest.approx(2 / 3)
    assert s["macc"] == pytest.approx(5 / 6)
    assert s["pixel_acc"] == pytest.approx(4 / 5)


def test_a_class_only_predicted_counts_in_miou_not_in_mean_accuracy():
    s = score([0, 1], [0, 0], 2)
    assert s["iou"] == pytest.approx([0.5, 0.0])  # union 1, intersection 0
    assert s["miou"] == pytest.approx(0.25)
    assert s["macc"] == pytest.approx(0.5)  # class 1 has no labelled pixel: left out
    assert s["pixel_acc"] == pytest.approx(0.5)


def test_areas_are_summed_over_the_split_before_dividing():
    """Not a mean of per-image mIoUs: image A all class 0 right, image B mostly class 1."""
    conf = confusion(torch.zeros(4), torch.zeros(4), 2) + confusion(
        torch.tensor([1, 1, 1, 1]), torch.tensor([0, 1, 1, 1]), 2
    )
    s = scores(conf)
    assert s["iou"] == pytest.approx([4 / 5, 3 / 4])
    assert s["miou"] == pytest.approx(0.775)  # per-image means would give (1 + 0.375) / 2


def mmseg_reference(preds, labels, k, ignore=IGNORE):
    """mmsegmentation's intersect_and_union + total_area_to_metrics, in our own words: per image
    the histograms of the correct pixels, of the predictions and of the labels over the classes
    (ignored pixels dropped), summed over the images; IoU = intersection / union and Acc =
    intersection / label area per class, aAcc = total intersection / total label area, means
    over the classes skipping NaN (0 / 0)."""
    inter, area_pred, area_label = np.zeros(k), np.zeros(k), np.zeros(k)
    for pred, label in zip(preds, labels, strict=True):
        keep = label != ignore
        p, lab = pred[keep], label[keep]
        inter += np.histogram(p[p == lab], bins=k, range=(0, k - 1))[0]
        area_pred += np.histogram(p, bins=k, range=(0, k - 1))[0]
        area_label += np.histogram(lab, bins=k, range=(0, k - 1))[0]
    union = area_pred + area_label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / area_label
    return np.nanmean(iou), np.nanmean(acc), inter.sum() / area_label.sum(), iou


class OneProcess:
    """The accelerator calls segmentation_metrics makes, for a single process."""

    is_main_process = True
    device = torch.device("cpu")

    def autocast(self):
        return contextlib.nullcontext()

    def gather_for_metrics(self, x):
        return x


def test_evaluation_pass_equals_the_mmsegmentation_definition():
    """Random predictions on images of two sizes, ignored pixels and a class that never occurs,
    through the evaluation pass (logits at a quarter of the size upsampled to the mask's)."""
    g = torch.Generator().manual_seed(0)
    k, batches, preds, labels = 6, [], [], []
    for h, w in [(8, 12), (12, 8), (8, 8), (16, 12)]:
        logits = torch.randn(1, k, h, w, generator=g)
        logits[:, 5] -= 100  # class 5: never predicted, never labelled
        pred = upsample(logits, (2 * h, 2 * w)).argmax(1)[0]
        label = torch.where(
            torch.rand(2 * h, 2 * w, generator=g) < 0.6,
            pred,
            torch.randint(0, 5, (2 * h, 2 * w), generator=g),
        )
        label[torch.rand(2 * h, 2 * w, generator=g) < 0.1] = IGNORE
        batches.append({"images": logits, "masks": label[None]})
        preds.append(pred.numpy())
        labels.append(label.numpy())
    report = segmentation_metrics(
        lambda x: x,
        batches,
        OneProcess(),
        [str(c) for c in range(k)],
        (0.0,) * 6,
        (1.0,) * 6,
        samples=2,
    )
    miou, macc, aacc, iou = mmseg_reference(preds, labels, k)
    assert report.metrics["miou"] == pytest.approx(100 * miou, abs=1e-3)
    assert report.metrics["macc"] == pytest.approx(100 * macc, abs=1e-3)
    assert report.metrics["pixel_acc"] == pytest.approx(100 * aacc, abs=1e-3)
    assert report.table[5]["iou"] is None and report.table[5]["label_pixels"] == 0
    assert [r["iou"] for r in report.table[:5]] == pytest.approx(list(100 * iou[:5]), abs=1e-3)
    assert len(report.samples) == 2 and report.samples[1][1].shape == (24, 16)


# --- inference --------------------------------------------------------------------------------


def pixelwise(x: torch.Tensor) -> torch.Tensor:
    """A per-pixel function (no neighbourhood): any window gives the same value per pixel."""
    w = torch.arange(12.0).reshape(4, 3)
    return torch.einsum("kc,bchw->bkhw", w, x) + x.square().sum(1, keepdim=True)


def test_sliding_windows_cover_every_pixel_and_average_overlaps():
    x = torch.randn(2, 3, 48, 80)
    assert torch.allclose(slide(pixelwise, x, 32, 21, 8), pixelwise(x), atol=1e-5)
    calls = []
    slide(lambda t: calls.append(t.shape[-2:]) or pixelwise(t), x, 32, 21, 8)
    assert len(calls) == 2 * 4 and all(tuple(c) == (32, 32) for c in calls)  # rows x cols


def test_sliding_window_equals_whole_image_when_the_crop_covers_it():
    probe = SegProbe(backbone(), SegProbeConfig(num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = probe.logits(x)
        assert torch.equal(slide(probe.logits, x, 32, 21, 8), want)
        assert torch.equal(
            slide(probe.logits, x[..., :24, :], 32, 21, 8), probe.logits(x[..., :24, :])
        )
        assert torch.equal(probe.predict(x), want)  # slide mode, crop = model.img_size


def test_whole_image_pads_to_the_patch_multiple_and_crops_back():
    x = torch.randn(1, 3, 30, 45)
    calls = []
    out = whole(lambda t: calls.append(t.shape[-2:]) or pixelwise(t), x, 8)
    assert tuple(calls[0]) == (32, 48) and torch.allclose(out, pixelwise(x))


def test_multiscale_flip_averages_probabilities_over_scales_and_flips():
    x = torch.randn(1, 3, 16, 16)
    fn = pixelwise
    out = Inference("whole", 16, 10, 8, (1.0, 2.0))(fn, x)
    big = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    want = 2 * fn(x).softmax(1) + 2 * upsample(fn(big), (16, 16)).softmax(1)  # flips equal here
    assert torch.allclose(out, (want / 4).log(), atol=1e-5)


def test_patch_logits_land_on_their_own_pixels():
    """A one-hot feature map: patch (r, c) alone holds class r * w + c. Upsampled bilinearly to
    the pixels, each pixel's argmax is the patch that covers it (no shift, no transpose)."""
    h, w, p = 3, 5, 8
    tokens = torch.cat([torch.zeros(1, 1, h * w), torch.eye(h * w)[None]], dim=1)  # cls + patches
    fmap = token_map(tokens, 1, (h, w), cls=False)
    assert fmap.shape == (1, h * w, h, w)
    assert torch.equal(fmap[0].argmax(0), torch.arange(h * w).reshape(h, w))
    rows = torch.arange(h * p)[:, None] // p
    cols = torch.arange(w * p)[None, :] // p
    assert torch.equal(upsample(fmap, (h * p, w * p))[0].argmax(0), rows * w + cols)
    # the same through the probe: its head set to the identity, its features replaced
    probe = SegProbe(backbone(), SegProbeConfig(num_classes=h * w, dropout=0.0, batchnorm=False))
    probe.conv = torch.nn.Conv2d(h * w, h * w, 1)
    with torch.no_grad():
        probe.conv.weight.copy_(torch.eye(h * w)[..., None, None])
        probe.conv.bias.zero_()
    probe.features = lambda images: fmap.expand(len(images), -1, -1, -1)
    pixels = probe.logits(torch.zeros(2, 3, h * p, w * p)).argmax(1)
    assert torch.equal(pixels, (rows * w + cols).expand(2, -1, -1))


def test_dinov2_variant_concatenates_four_blocks_each_with_its_cls_token():
    bb = backbone(depth=5)
    probe = SegProbe(bb, SegProbeConfig(num_classes=3, variant="dinov2")).eval()
    assert probe.conv.in_channels == 4 * 2 * 32 and isinstance(probe.norm, torch.nn.BatchNorm2d)
    x = torch.randn(2, 3, 32, 32)
    layers = bb(x, n_last=4).layers
    f = probe.features(x)
    for i, layer in enumerate(layers):
        part = f[:, 64 * i : 64 * (i + 1)]
        assert torch.allclose(part[:, :32], layer[:, 0, :, None, None].expand(-1, -1, 4, 4))
        assert torch.allclose(part[:, 32:, 1, 2], layer[:, 1 + 1 * 4 + 2])


def test_dinov3_defaults_head_init_and_schedule():
    cfg = segprobe_config()
    t, m = cfg.train, cfg.method
    assert (t.lr, t.weight_decay, t.steps, t.batch_size, t.optimizer) == (
        1e-3,
        1e-3,
        40_000,
        16,
        "adamw",
    )
    assert (m.betas, m.dropout, m.warmup_iters, m.warmup_start) == ((0.9, 0.999), 0.1, 1500, 1e-6)
    assert cfg.model.img_size == 512 and m.scale_range == (0.5, 2.0)
    probe = SegProbe(backbone(img_size=64), SegProbeConfig(num_classes=150, n_blocks=0))
    assert probe.inference.crop == 64 and probe.inference.stride == 42  # 512 -> 341
    assert probe.conv.in_channels == 32 and probe.n_blocks == 1 and not probe.cls
    w = probe.conv.weight.detach()
    assert 0.0095 < w.std() < 0.0105 and torch.equal(probe.conv.bias, torch.zeros(150))
    assert [p for p in probe.parameters() if p.requires_grad] == [
        probe.norm.weight,
        probe.norm.bias,
        probe.conv.weight,
        probe.conv.bias,
    ]
    lr = [probe.lr_at(s, 40_000, 0, 1e-3, 0.0) for s in (0, 750, 1500, 20_750, 40_000)]
    assert lr == pytest.approx([1e-9, 5e-4 + 5e-10, 1e-3, 5e-4, 0.0], abs=1e-12)


def test_loss_ignores_255_and_is_zero_when_every_pixel_is():
    """The official DINOv3 linear loss: the cross-entropy summed over the pixels not labelled
    255, divided by all the pixels (its CrossEntropyLoss, reduction mean, avg_non_ignore false):
    here a quarter of them ignored."""
    probe = SegProbe(backbone(), SegProbeConfig(num_classes=4, dropout=0.0)).eval()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.randint(0, 4, (2, 32, 32))
    masks[0, :16] = IGNORE
    logits = probe.logits(x)
    keep = masks != IGNORE
    want = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], masks[keep], reduction="sum") / 2048
    assert torch.allclose(probe.training_step({"images": x, "masks": masks})["loss"], want)
    none = probe.training_step({"images": x, "masks": torch.full_like(masks, IGNORE)})["loss"]
    assert none.item() == 0.0


def test_the_checkpoint_gives_the_architecture_and_the_protocol_its_crop(tmp_path):
    """model.name / patch_size come from the checkpoint, model.img_size stays the protocol's
    crop (512): the position embedding is resampled to its grid."""
    export_backbone(backbone(), tmp_path)
    cfg = segprobe_config()
    cfg.method.checkpoint = str(tmp_path)
    cfg = from_checkpoint(cfg, set())
    assert (cfg.model.name, cfg.model.patch_size, cfg.model.img_size) == (
        "vit_tiny_patch16_224",
        8,
        512,
    )
    bb = pretrained_backbone(cfg)
    assert bb.grid_size == (64, 64) and bb.pos_embed.shape[1] == 1 + 64 * 64


# --- end to end -------------------------------------------------------------------------------


def test_segprobe_learns_synthetic_segmentation_end_to_end(tmp_path, capsys):
    """`ssl-vit segprobe` on a random ViT (4 px patches: an 8 x 8 grid at 32 px), DINOv2's head,
    200 steps: mIoU on the held-out split more than twice the frequency baseline (the most
    frequent training class everywhere); the JSON line names the split; the per-class table and
    the picture are in the run directory."""
    torch.manual_seed(0)
    bb = Backbone("vit_tiny_patch16_224", **TINY | dict(patch_size=4))
    export_backbone(bb, tmp_path / "bb")
    run = tmp_path / "run"
    args = ["--data.path", "synthetic", "--data.synthetic_size", "200", "--data.num_workers", "0"]
    args += ["--model.img_size", "32", "--train.batch_size", "8", "--train.steps", "200"]
    args += ["--train.lr", "1e-2", "--method.warmup_iters", "10", "--train.log_every", "50"]
    argv = ["segprobe", "--checkpoint", str(tmp_path / "bb"), "--variant", "dinov2", *args]
    assert cli_main([*argv, "--train.output_dir", str(run)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 200 and result["eval_split"] == "val" and result["held_out"] is True
    baseline = synthetic_frequency_baseline()
    assert 5 < baseline < 8  # background, about 70 % of the pixels, over 11 classes
    assert result["val_miou"] > 2 * baseline, (result, baseline)
    with open(run / "segmentation_val.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["class"] for r in table] == ["background", *SYNTHETIC_CLASSES[:10]]
    ious = [float(r["iou"]) for r in table if r["iou"]]
    assert sum(ious) / len(ious) == pytest.approx(result["val_miou"], abs=1e-2)
    assert (run / "segmentation_val.png").stat().st_size > 10_000
    events = EventAccumulator(str(next((run / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert events.Tags()["images"] == ["images/segmentation_val"]
    [miou] = events.Scalars("eval/val/val_miou")
    assert miou.step == 200 and miou.value == pytest.approx(result["val_miou"], abs=1e-3)
