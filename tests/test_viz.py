"""Visualisations: attention distance, threshold masks and position-embedding similarity against
hand-computed cases; MAE panels' de-normalisation; TensorBoard summaries; every `ssl-vit
visualize` command on a tiny synthetic-trained run."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from PIL import Image
from torch import nn

from ssl_vit.backbone import Backbone
from ssl_vit.cli.visualize import main as visualize
from ssl_vit.config import IMAGENET_MEAN, IMAGENET_STD, Config, DataConfig, ModelConfig, TrainConfig
from ssl_vit.methods.mae import MAE, MAEConfig
from ssl_vit.methods.protocol import Method
from ssl_vit.ops import patchify, random_masking, sincos_pos_embed_2d
from ssl_vit.train.loop import fit
from ssl_vit.viz import (
    layer_attentions,
    load_mae,
    mae_panels,
    mean_attention_distance,
    patch_pos_embed,
    pos_embed_similarity,
    tensorboard_images,
    threshold_mask,
    to_pixels,
)

from tolerances import ROUNDING

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)  # 4 x 4 patches


def tiny_mae(norm_pix: bool = True, seed: int = 0, **backbone_kw) -> MAE:
    torch.manual_seed(seed)
    backbone = Backbone("vit_tiny_patch16_224", **(TINY | backbone_kw))
    return MAE(
        backbone,
        MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=16, norm_pix_loss=norm_pix),
    ).eval()


def normalised_images(b: int = 3, seed: int = 1) -> torch.Tensor:
    """(b, 3, 32, 32) pixels in [0, 1] normalised with the ImageNet statistics."""
    pixels = torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


# ---------------------------------------------------------------------------------------------
# Attention distance


def test_uniform_attention_distance_is_the_mean_pairwise_patch_distance():
    h, w, p, prefix = 3, 4, 5, 1
    t = prefix + h * w
    attn = torch.full((2, 3, t, t), 1 / t)
    expected = 0.0
    for r1 in range(h):
        for c1 in range(w):
            for r2 in range(h):
                for c2 in range(w):
                    expected += p * math.hypot(r1 - r2, c1 - c2)
    expected /= (h * w) ** 2  # 8.0616... px
    got = mean_attention_distance(attn, prefix, (h, w), p)
    assert got.shape == (2, 3)
    # a float32 mean of 4,096 distances of up to 40 px against float64: ~1e-6 relative of 8 px
    torch.testing.assert_close(got, torch.full((2, 3), expected), atol=1e-5, rtol=0)


def test_attention_to_self_is_distance_zero_and_cls_mass_is_left_out():
    h, w, prefix = 3, 3, 1
    t = prefix + h * w
    self_only = torch.eye(t).expand(2, 2, t, t)
    assert mean_attention_distance(self_only, prefix, (h, w), 16).abs().max() == 0
    half_on_cls = 0.5 * torch.eye(t)
    half_on_cls[:, 0] += 0.5
    assert mean_attention_distance(half_on_cls[None, None], prefix, (h, w), 16).item() == 0


def test_attention_distance_hand_case():
    # A 1 x 3 grid, patch 4: query 0 looks at patch 2 (8 px), query 1 at patch 0 (4 px), query 2
    # at itself (0 px) -> mean 4 px; no prefix token.
    attn = torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 0, 1]])[None, None]
    assert mean_attention_distance(attn, 0, (1, 3), 4).item() == pytest.approx(4.0)


def test_layer_attentions_equal_timm_eager_attention_of_every_block():
    torch.manual_seed(0)
    backbone = Backbone("vit_tiny_patch16_224", **TINY).eval()
    x = normalised_images(2)
    assert all(b.attn.fused_attn for b in backbone.blocks)  # what training runs
    got = layer_attentions(backbone, x)
    assert all(not b._forward_pre_hooks for b in backbone.blocks)  # hooks removed
    # Oracle: timm's own eager path, whose attn_drop (identity in eval) receives the softmax.
    eager = []
    for b in backbone.blocks:
        b.attn.fused_attn = False
        b.attn.attn_drop.register_forward_hook(lambda m, a, o: eager.append(o))
    with torch.no_grad():
        backbone(x)
    assert len(got) == len(eager) == 2
    for g, e in zip(got, eager, strict=True):
        assert g.shape == (2, 3, 17, 17)
        torch.testing.assert_close(g, e, **ROUNDING)
    sums = layer_attentions(backbone, x, lambda a: a.sum(dim=(0, 2, 3)))
    torch.testing.assert_close(sums[1], torch.full((3,), 2 * 17.0))


# ---------------------------------------------------------------------------------------------
# Threshold mask


def test_threshold_mask_keeps_the_fewest_tokens_reaching_the_mass():
    row = torch.tensor([0.05, 0.5, 0.15, 0.3])
    cases = {0.3: [0, 1, 0, 0], 0.6: [0, 1, 0, 1], 0.9: [0, 1, 1, 1], 1.0: [1, 1, 1, 1]}
    for fraction, keep in cases.items():
        assert threshold_mask(row, fraction).tolist() == [bool(k) for k in keep], fraction
        assert threshold_mask(7 * row, fraction).tolist() == [bool(k) for k in keep]  # unnormalised


def test_threshold_mask_equals_dino_formulation():
    attn = torch.rand(6, 50, generator=torch.Generator().manual_seed(0)) ** 4
    for fraction in (0.3, 0.6, 0.9):
        # DINO's visualize_attention.py: ascending sort, cumsum > 1 - threshold, un-sort.
        val, idx = torch.sort(attn)
        val = val / val.sum(dim=1, keepdim=True)
        th = torch.cumsum(val, dim=1) > 1 - fraction
        dino = th.gather(1, torch.argsort(idx))
        got = threshold_mask(attn, fraction)
        assert torch.equal(got, dino)
        share = (attn * got).sum(1) / attn.sum(1)
        smallest_kept = torch.where(got, attn, torch.inf).min(1).values / attn.sum(1)
        assert (share >= fraction).all() and (share - smallest_kept < fraction).all()


# ---------------------------------------------------------------------------------------------
# Position-embedding similarity


def test_sincos_position_similarity_diagonal_and_neighbours():
    h, w = 5, 6
    sim = pos_embed_similarity(sincos_pos_embed_2d(32, h, w))
    torch.testing.assert_close(sim.diagonal(), torch.ones(h * w), **ROUNDING)
    for i in range(h * w):
        near, far = [], []
        for j in range(h * w):
            d = math.hypot(i // w - j // w, i % w - j % w)
            if d == 1:
                near.append(sim[i, j].item())
            elif d >= 2:
                far.append(sim[i, j].item())
        assert min(near) > max(far) + 0.05, i


def test_patch_pos_embed_drops_the_cls_position():
    mae = tiny_mae()
    torch.testing.assert_close(patch_pos_embed(mae.backbone), sincos_pos_embed_2d(48, 4, 4))


# ---------------------------------------------------------------------------------------------
# MAE panels


def norm_pix_target(images: torch.Tensor, p: int) -> torch.Tensor:
    """Independent per-patch normalisation: mean and unbiased std of each patch, by loops."""
    patches = patchify(images, p)
    out = torch.empty_like(patches)
    for b in range(patches.shape[0]):
        for i in range(patches.shape[1]):
            v = patches[b, i]
            n = v.numel()
            mean = v.sum() / n
            var = ((v - mean) ** 2).sum() / (n - 1)
            out[b, i] = (v - mean) / math.sqrt(var + 1e-6)
    return out


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_panels_denormalise_a_perfect_prediction_to_the_image(norm_pix):
    mae = tiny_mae(norm_pix=norm_pix)
    images = normalised_images()
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(2))
    _, mask, _ = random_masking(3, 16, 0.75, "cpu", noise)
    perfect = norm_pix_target(images, 8) if norm_pix else patchify(images, 8)
    mae.forward_loss = lambda x, n=None: {"pred": perfect, "mask": mask}
    panels = mae_panels(mae, images, noise, IMAGENET_MEAN, IMAGENET_STD)
    assert panels.shape == (3, 4, 3, 32, 32)
    original = to_pixels(images, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(panels[:, 0], original)
    # norm-pix targets de-normalised (x std + mean over 192 values) then un-normalised to pixels:
    # a handful of roundings, each scaled by up to 1 / (ImageNet std 0.225)
    torch.testing.assert_close(panels[:, 2], original, atol=1e-5, rtol=0)
    torch.testing.assert_close(panels[:, 3], original, atol=1e-5, rtol=0)
    removed = patchify(torch.ones(3, 3, 32, 32), 8) * mask[..., None]  # patch-wise mask
    masked = patchify(panels[:, 1], 8)
    assert (masked[removed.bool()] == 0.5).all()
    assert torch.equal(masked[~removed.bool()], patchify(original, 8)[~removed.bool()])


def test_mae_panels_pasted_equals_mae_reconstruct():
    mae = tiny_mae()
    images = normalised_images()
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(3))
    panels = mae_panels(mae, images, noise, IMAGENET_MEAN, IMAGENET_STD)
    expected = to_pixels(mae.reconstruct(images, noise), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(panels[:, 3], expected, **ROUNDING)


def test_load_mae_from_an_official_full_checkpoint(tmp_path):
    # ViT-Ti width (192, 3 heads: a standard size, so load_pretrained infers it), 1 block.
    src = tiny_mae(img_size=32, patch_size=8, embed_dim=192, depth=1, num_heads=3)
    official = {k.removeprefix("backbone."): v for k, v in src.state_dict().items()}
    args = argparse.Namespace(norm_pix_loss=False, mask_ratio=0.6)
    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    torch.save({"model": official, "args": args, "epoch": 1}, path)
    mae = load_mae(path)
    assert (mae.cfg.norm_pix_loss, mae.cfg.mask_ratio) == (False, 0.6)
    assert (mae.cfg.decoder_dim, mae.cfg.decoder_depth, mae.cfg.decoder_mlp_ratio) == (32, 1, 4.0)
    for key, value in src.state_dict().items():
        assert torch.equal(mae.state_dict()[key], value), key
    assert load_mae(path, norm_pix="true").cfg.norm_pix_loss


# ---------------------------------------------------------------------------------------------
# TensorBoard


class EncoderOnly(nn.Module, Method):
    """A method other than MAE (as DINO, DeiT): only attention summaries."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone


def test_tensorboard_images_shapes_rng_and_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    mae = tiny_mae().train()
    images = normalised_images(3)
    rng = torch.get_rng_state()
    out = tensorboard_images(mae, images)
    assert torch.equal(torch.get_rng_state(), rng) and mae.training
    # 3 rows of 34 px tiles (+2 px border); attention: image, 3 heads, mean; MAE: 4 panels.
    assert out["attention"].shape == (3, 3 * 34 + 2, 5 * 34 + 2)
    assert out["mae_reconstruction"].shape == (3, 3 * 34 + 2, 4 * 34 + 2)
    assert all(0 <= v.min() and v.max() <= 1 for v in out.values())
    torch.testing.assert_close(tensorboard_images(mae, images), out)  # the same mask every call
    only_attn = tensorboard_images(EncoderOnly(mae.backbone), images)
    assert set(only_attn) == {"attention"}

    writer = SummaryWriter(str(tmp_path))
    for tag, image in out.items():
        writer.add_image(tag, image, 7)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["attention", "mae_reconstruction"]
    (event,) = events.Images("attention")
    assert (event.step, event.width, event.height) == (7, 172, 104)


# ---------------------------------------------------------------------------------------------
# Commands on a tiny synthetic-trained run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("viz") / "run"
    fit(
        Config(
            model=ModelConfig(name="vit_tiny_patch16_224", **TINY),
            data=DataConfig(synthetic_size=16, num_workers=0),
            train=TrainConfig(
                output_dir=str(run), epochs=1, warmup_epochs=0, batch_size=8, log_every=1
            ),
            method=MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2),
        )
    )
    return run


def command(capsys, *argv: str) -> dict:
    assert visualize(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def png_size(path) -> tuple[int, int]:
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_attention_command(run_dir, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (84, 40), (200, 30, 30)).save(image)  # short side 40 -> 32 x 67 -> 32 x 64
    out = tmp_path / "attention.png"
    result = command(
        capsys,
        "attention",
        "--checkpoint",
        str(run_dir),
        "--image",
        str(image),
        "--threshold",
        "0.6",
        "--output",
        str(out),
    )
    assert result["grid"] == [4, 8] and result["heads"] == 3
    # 2 rows (maps, masks) x (image + 3 heads + mean) panels of 160 px.
    assert png_size(out) == (5 * 160, 2 * 160) == (result["width"], result["height"])
    command(capsys, "attention", "--checkpoint", str(run_dir), "--viz.output", str(out))
    assert png_size(out) == (5 * 160, 160)  # no threshold row; a synthetic image


def test_mae_command(run_dir, tmp_path, capsys):
    out = tmp_path / "mae.png"
    result = command(
        capsys, "mae", "--checkpoint", str(run_dir), "--num_images", "2", "--output", str(out)
    )
    assert (result["mask_ratio"], result["norm_pix"]) == (0.75, True)
    assert png_size(out) == (4 * 160, 2 * 160)


def test_pos_embed_command(run_dir, tmp_path, capsys):
    out = tmp_path / "pos.png"
    command(
        capsys,
        "pos-embed",
        "--checkpoint",
        str(run_dir / "backbone"),
        "--output",
        str(out),
    )
    assert png_size(out) == (800, 800)


def test_attention_distance_command(run_dir, tmp_path, capsys):
    out = tmp_path / "dist.png"
    result = command(
        capsys,
        "attention-distance",
        "--checkpoint",
        str(run_dir),
        "--num_images",
        "5",
        "--batch_size",
        "2",
        "--output",
        str(out),
    )
    assert png_size(out) == (640, 480)
    distances = torch.tensor(result["mean_distance_px"])
    assert distances.shape == (2, 3)
    # Between 0 (attention to self) and the largest patch-centre distance of a 4 x 4 grid.
    assert (distances > 0).all() and (distances < 8 * math.hypot(3, 3)).all()


def test_command_errors_name_the_problem(run_dir, tmp_path, capsys):
    assert visualize(["mae", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert visualize(["attention", "--checkpoint", str(run_dir), "--thresold", "0.5"]) == 2
    assert "--viz.threshold" in capsys.readouterr().err  # the did-you-mean hint
    assert visualize(["attention", "--checkpoint", str(run_dir), "--threshold", "1.5"]) == 2
    assert "viz.threshold: must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert visualize(["colours", "--checkpoint", str(run_dir)]) == 2
    assert "unknown visualize command 'colours'" in capsys.readouterr().err
