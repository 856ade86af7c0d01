"""The Backbone over timm's DINOv3 model (an Eva: 2-D RoPE, 4 registers, layer scale, q/v bias):
features equal to timm's forward_features at two sizes; kept patches, mask-token replacement,
extra prefix tokens, patch dropout and activation checkpointing against references written here
from timm's blocks and rotary rows; the last block's attention against softmax(q k^T) computed
here; SwiGLU and register-free variants; fine-tuning's average pool; DINO and DINOv2 training on
it (finite losses, exact resume) and from an official-layout DINOv3 file (--model.init); that file
through load_pretrained into k-NN, linear probe, embed and the pictures; MAE, DeiT distillation
and the position-embedding picture refused in one line."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from conftest import TINY_METHODS, metrics, params, tiny
from safetensors.torch import load_file
from test_dinov3_import import dinov3, official_file

from ssl_vit.backbone import Backbone, attention_probs
from ssl_vit.cli import main as ssl_vit
from ssl_vit.eval.finetune import avg_pool_backbone
from ssl_vit.flops import ViTDims
from ssl_vit.methods.dinov2 import DINOv2, DINOv2Config
from ssl_vit.methods.mae import MAE, MAEConfig
from ssl_vit.registry import build_method, prepare
from ssl_vit.train.loop import fit
from ssl_vit.weights import distilled_backbone, load_pretrained

from tolerances import ROUNDING

pytestmark = pytest.mark.skipif(
    not timm.is_model("vit_small_patch16_dinov3_qkvb"), reason="timm without DINOv3 models"
)

NAME = "vit_small_patch16_dinov3_qkvb"
KW = {"img_size": 64, "embed_dim": 128, "depth": 2, "num_heads": 2}
"""A 4 x 4 grid of 16-px patches, 2 heads of 64 channels, cls + 4 registers, q/v bias."""


def make(**kw) -> tuple[Backbone, torch.nn.Module]:
    """A backbone and timm's model holding the same random weights (biases, norms, layer scales
    around 1, so that each of them shows), both in eval mode."""
    backbone = Backbone(NAME, **KW | kw).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in backbone.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if p.ndim == 1 else 0.0))
    model = timm.create_model(NAME, pretrained=False, num_classes=0, **KW | kw).eval()
    model.load_state_dict(backbone.state_dict(), strict=True)
    return backbone, model


def images(h: int = 64, w: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def rope_rows(model, h: int, w: int) -> torch.Tensor:
    """(h*w, 2 * head_dim) sin | cos of the grid, by timm's own rotary module."""
    return model.rope.get_embed(shape=[h, w])


def run_blocks(model, tokens: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """timm's blocks and final norm on prepared tokens: the reference for every path below."""
    for block in model.blocks:
        tokens = block(tokens, rope=rope)
    return model.norm(tokens)


def own_prefix(model, b: int = 2) -> torch.Tensor:
    return torch.cat([model.cls_token, model.reg_token], 1).expand(b, -1, -1)


@pytest.mark.parametrize("h, w", [(64, 64), (48, 80)])
@torch.no_grad()
def test_features_equal_timm_forward_features(h, w):
    """cls, 4 registers and every patch token after the final norm, at the built size and at a
    3 x 5 grid (RoPE: nothing resampled; the rows are those of the new grid)."""
    backbone, model = make()
    x = images(h, w)
    out = backbone(x)
    want = model.forward_features(x)
    assert out.tokens.shape == want.shape == (2, 5 + h * w // 256, 128) and out.num_prefix == 5
    assert (out.tokens - want).abs().max().item() <= ROUNDING["atol"]
    assert backbone.pos_embed is None and backbone.num_prefix_tokens == 5
    assert (backbone.patch_size, backbone.grid_size, backbone.num_heads) == (16, (4, 4), 2)
    assert backbone.to_timm().state_dict().keys() == model.state_dict().keys()
    # the control: without the rotation the features differ far beyond the tolerance
    plain = run_blocks(
        model, torch.cat([own_prefix(model), model.patch_embed(x).flatten(1, 2)], 1), None
    )
    assert (plain - want).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    "kw", [{"swiglu_mlp": True, "swiglu_align_to": 8}, {"num_reg_tokens": 0}], ids=str
)
@torch.no_grad()
def test_swiglu_and_register_free_variants_equal_timm(kw):
    backbone, model = make(**kw)
    x = images(48, 80)
    out, want = backbone(x), model.forward_features(x)
    assert out.num_prefix == model.num_prefix_tokens == 1 + kw.get("num_reg_tokens", 4)
    assert (out.tokens - want).abs().max().item() <= ROUNDING["atol"]
    if "swiglu_mlp" in kw:  # not counted by the FLOPs model (bench: MFU null), not a crash
        with pytest.raises(ValueError, match="not a standard ViT block"):
            ViTDims.of(backbone)


@torch.no_grad()
def test_kept_patches_equal_timm_blocks_with_the_gathered_rotary_rows():
    backbone, model = make()
    x = images()
    ids = torch.tensor([[0, 9, 15, 3, 6], [5, 4, 12, 1, 14]])
    out = backbone(x, ids_keep=ids)
    patches = model.patch_embed(x).flatten(1, 2)  # (B, 16, D): row-major
    kept = torch.stack([patches[i, ids[i]] for i in range(2)])
    rows = rope_rows(model, 4, 4)
    gathered = torch.stack([rows[ids[i]] for i in range(2)]).unsqueeze(1)  # (B, 1, K, 2 Dh)
    want = run_blocks(model, torch.cat([own_prefix(model), kept], 1), gathered)
    assert out.tokens.shape == (2, 5 + 5, 128)
    assert (out.tokens - want).abs().max().item() <= ROUNDING["atol"]
    # the control: the first five rows instead of the kept patches' own
    wrong = run_blocks(model, torch.cat([own_prefix(model), kept], 1), rows[:5])
    assert (wrong - want).abs().max().item() > 1e-2


@torch.no_grad()
def test_mask_token_replacement_equals_reference():
    """DINOv2's student input: the masked patches' embeddings replaced by the mask token before
    the blocks, each still rotated by its own position."""
    backbone, model = make()
    x = images()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 2, 7]] = True
    mask[1, [0, 15]] = True
    token = torch.randn(1, 128, generator=torch.Generator().manual_seed(5))
    out = backbone(x, mask=mask, mask_token=token)
    patches = model.patch_embed(x).flatten(1, 2).clone()
    patches[mask] = token[0]
    want = run_blocks(model, torch.cat([own_prefix(model), patches], 1), rope_rows(model, 4, 4))
    assert (out.tokens - want).abs().max().item() <= ROUNDING["atol"]
    assert (backbone(x).tokens - want).abs().max().item() > 1e-2


@torch.no_grad()
def test_extra_prefix_tokens_are_not_rotated():
    """A method's extra tokens after the model's own: the reference moves each attention's
    `num_prefix_tokens` (timm's own way of leaving tokens unrotated) past them."""
    backbone, model = make()
    x = images()
    extra = torch.randn(2, 2, 128, generator=torch.Generator().manual_seed(6))
    out = backbone(x, prefix=extra)
    for block in model.blocks:
        block.attn.num_prefix_tokens = 5 + 2
    tokens = torch.cat([own_prefix(model), extra, model.patch_embed(x).flatten(1, 2)], 1)
    want = run_blocks(model, tokens, rope_rows(model, 4, 4))
    assert out.num_prefix == 7 and out.tokens.shape == (2, 7 + 16, 128)
    assert (out.tokens - want).abs().max().item() <= ROUNDING["atol"]
    for block in model.blocks:  # the control: the extra tokens rotated (by two patches' rows)
        block.attn.num_prefix_tokens = 5
    rows = rope_rows(model, 4, 4)
    rotated = run_blocks(model, tokens, torch.cat([rows[:2], rows]))
    assert (rotated - want).abs().max().item() > 1e-3


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


@torch.no_grad()
def test_attention_probs_equal_softmax_of_rotated_q_k():
    """The last block's attention (return_attn) against softmax(q k^T / sqrt(Dh)) computed here:
    q = W_q h + b_q, k = W_k h (no key bias), both rotated past the 5 prefix tokens by the grid's
    rows (DINOv3's half layout: x cos + rotate_half(x) sin); rows sum to 1."""
    backbone, model = make()
    x = images()
    out = backbone(x, return_attn=True)
    tokens = torch.cat([own_prefix(model), model.patch_embed(x).flatten(1, 2)], 1)
    rows = rope_rows(model, 4, 4)
    tokens = model.blocks[0](tokens, rope=rows)  # the last block's input
    block = model.blocks[1]
    h = block.norm1(tokens)
    w_q, w_k, _ = block.attn.qkv.weight.chunk(3)
    q = (h @ w_q.T + block.attn.q_bias).unflatten(-1, (2, 64)).transpose(1, 2)
    k = (h @ w_k.T).unflatten(-1, (2, 64)).transpose(1, 2)
    sin, cos = rows.chunk(2, dim=-1)

    def rotated(t):
        return torch.cat([t[:, :, :5], t[:, :, 5:] * cos + rotate_half(t[:, :, 5:]) * sin], 2)

    want = (rotated(q) @ rotated(k).transpose(-2, -1) / 8.0).softmax(-1)
    assert out.attn.shape == (2, 2, 21, 21)
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(2, 2, 21), **ROUNDING)
    assert (out.attn - want).abs().max().item() <= ROUNDING["atol"]
    assert (attention_probs(block, tokens, rows) - want).abs().max().item() <= ROUNDING["atol"]
    unrotated = (q @ k.transpose(-2, -1) / 8.0).softmax(-1)
    assert (unrotated - want).abs().max().item() > 1e-3  # the rotation shows


def test_patch_dropout_and_checkpointing_follow_timm():
    """Eva's patch dropout in training (the same RNG draws as timm's forward, the kept patches'
    rotary rows gathered alike), and activation checkpointing (rope passed to the re-run blocks):
    the same features and gradients as timm's own."""
    backbone, model = make(patch_drop_rate=0.5)
    backbone.train(), model.train()
    x = images()
    torch.manual_seed(3)
    got = backbone(x).tokens
    torch.manual_seed(3)
    want = model.forward_features(x)
    assert got.shape == want.shape == (2, 5 + 8, 128)
    assert (got - want).abs().max().item() <= ROUNDING["atol"]
    backbone, model = make()
    backbone.set_grad_checkpointing(True)
    model.set_grad_checkpointing(True)
    backbone(x).tokens.square().mean().backward()
    model.forward_features(x).square().mean().backward()
    for (name, a), b in zip(backbone.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0.0, atol=1e-6, msg=name)


@torch.no_grad()
def test_avg_pool_classifier_features_equal_timms_avg_pool():
    """Fine-tuning's global_pool avg on the Eva: timm keeps its final norm (use_fc_norm False),
    pools the patch tokens; the pooled backbone loads strictly and gives timm's pooled features."""
    backbone, _ = make()
    pooled = avg_pool_backbone(backbone).eval()
    model = timm.create_model(NAME, num_classes=0, global_pool="avg", **KW).eval()
    model.load_state_dict(pooled.state_dict(), strict=True)
    x = images()
    out = pooled(x)
    got = pooled.fc_norm(out.tokens[:, out.num_prefix :].mean(dim=1))
    assert (got - model(x)).abs().max().item() <= ROUNDING["atol"]
    assert torch.equal(pooled.norm.weight, backbone.norm.weight)


def test_mae_and_distillation_are_refused_in_one_line():
    backbone, _ = make()
    with pytest.raises(ValueError, match="MAE needs a backbone with a cls token, no registers"):
        MAE(backbone, MAEConfig())
    with pytest.raises(ValueError, match="distillation token"):
        distilled_backbone(backbone)
    DINOv2(backbone, DINOv2Config(**TINY_METHODS["dinov2"]))  # builds: its teacher a copy


DINOV3_MODEL = {"name": "vit_small_patch16_dinov3", "num_heads": 2}
"""TINY_MODEL's width 32, 2 blocks, 8-px patches on 32 px (16 px local crops), as a DINOv3 Eva."""


@pytest.mark.parametrize("method", ["dinov2", "dino"])
def test_training_on_a_dinov3_backbone_resumes_bit_identically(method, tmp_path):
    """4 steps straight, and 2 steps then a resume to 4: finite losses, the same parameters bit
    for bit and the same logged losses."""
    schedule = dict(epochs=10, save_every_steps=2, keep_last=10)
    fit(tiny(tmp_path / "straight", method, model=DINOV3_MODEL, max_steps=4, **schedule))
    fit(tiny(tmp_path / "stopped", method, model=DINOV3_MODEL, max_steps=2, **schedule))
    fit(
        tiny(
            tmp_path / "stopped", method, model=DINOV3_MODEL, max_steps=4, resume="auto", **schedule
        )
    )
    losses = [m["loss"] for m in metrics(tmp_path / "straight")]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    a, b = params(tmp_path / "straight", 4), params(tmp_path / "stopped", 4)
    assert any(k.endswith("rope.periods") for k in a) is False and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed parameters differ"
    resumed = {m["step"]: m["loss"] for m in metrics(tmp_path / "stopped")}
    assert [resumed[s] for s in (3, 4)] == losses[2:]
    assert a["backbone.reg_token"].shape == (1, 4, 32)
    exported = json.loads((tmp_path / "straight" / "backbone" / "config.json").read_text())
    assert exported["architecture"] == "vit_small_patch16_dinov3"


@pytest.mark.parametrize("method_name", ["dinov2", "dinov3"])
def test_continued_pretraining_starts_from_an_official_dinov3_file(method_name, tmp_path):
    """--model.init: the file's architecture (timm's DINOv3 Eva) and weights for student and
    teacher (and DINOv3's Gram teacher), features equal to timm's at the run's image size (RoPE:
    nothing to resample); one training step with a finite loss."""
    model = dinov3("reg4_qkvb")
    path = tmp_path / "dinov3_vitb16_pretrain.pth"
    torch.save(official_file("reg4_qkvb", "pretrain", model), path)
    sizes = dict.fromkeys(("patch_size", "embed_dim", "depth", "num_heads"), 0)  # the file's
    model_cfg = {"init": str(path), "img_size": 48, **sizes}
    cfg = tiny(tmp_path / "run", method_name, model=model_cfg, max_steps=1)
    prepare(cfg)
    assert (cfg.model.name, cfg.model.embed_dim) == ("vit_base_patch16_dinov3_qkvb", 128)
    method = build_method(cfg)
    nets = [method.backbone, method.teacher.backbone]
    nets += [method.gram_teacher] if method_name == "dinov3" else []
    x = images(48, 48)
    with torch.no_grad():
        want = model.forward_features(x)
        for net in nets:
            assert (net.eval()(x).tokens - want).abs().max().item() <= ROUNDING["atol"]
    result = fit(cfg)
    assert result["steps"] == 1 and math.isfinite(result["final_loss"])


def test_official_dinov3_file_through_every_evaluation(tmp_path, capsys):
    """An official-layout file (the released state dict) -> load_pretrained: timm's features;
    then `ssl-vit knn`, `linprobe`, `embed` and `visualize attention / pca /
    attention-distance` on it end to end on synthetic data (`pos-embed`: none to show)."""
    model = dinov3("reg4_qkvb")
    path = tmp_path / "dinov3_vitb16_pretrain.pth"
    torch.save(official_file("reg4_qkvb", "pretrain", model), path)
    backbone = load_pretrained(path).eval()
    assert backbone.name == "vit_base_patch16_dinov3_qkvb"
    x = images(48, 80)
    with torch.no_grad():
        diff = (backbone(x).tokens - model.forward_features(x)).abs().max().item()
    assert diff <= ROUNDING["atol"]

    def run(*argv: str) -> dict:
        assert ssl_vit(list(argv)) == 0, argv
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    data = ["--data.num_workers", "0", "--data.synthetic_size", "32"]
    knn = run("knn", "--checkpoint", str(path), "--knn.k", "3", "--knn.img_size", "64", *data)
    assert 0.0 <= knn["knn_top1"] <= 100.0
    probe = tmp_path / "probe"
    out = run(
        "linprobe", "--checkpoint", str(path), "--train.output_dir", str(probe),
        "--train.epochs", "1", "--train.warmup_epochs", "0", "--train.batch_size", "16",
        "--model.img_size", "64", *data,
    )  # fmt: skip
    assert 0.0 <= out["val_top1"] <= 100.0 and math.isfinite(out["final_loss"])
    emb = tmp_path / "emb.safetensors"
    run("embed", "--checkpoint", str(path), "--embed.output", str(emb), "--embed.img_size", "64",
        "--embed.pool", "cls_avgpool", *data)  # fmt: skip
    assert load_file(str(emb))["embeddings"].shape[-1] == 2 * 128
    for command in ("attention", "pca", "attention-distance"):
        picture = tmp_path / f"{command}.png"
        run("visualize", command, "--checkpoint", str(path), "--viz.output", str(picture),
            "--viz.img_size", "64", "--data.num_workers", "0")  # fmt: skip
        assert picture.stat().st_size > 1000
    assert ssl_vit(["visualize", "pos-embed", "--checkpoint", str(path)]) == 2
    assert "no absolute position embedding" in capsys.readouterr().err
