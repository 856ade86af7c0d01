"""Official DINOv3 checkpoints through the one loader: a tiny timm DINOv3 model (an Eva with RoPE,
registers or none, masked or absent qkv bias, layer scale or none, MLP or SwiGLU) written in the
official DinoVisionTransformer key layout by this file's own inverse map, loads into timm's model
with its features (cls, registers, patches after the final norm) at the training size and at
another (RoPE: nothing to resample), also as the Backbone (load_pretrained); `ssl-vit import` /
`export` round-trip it in timm's layout;
a swapped, dropped or altered key or value is caught."""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
from timm.models.eva import checkpoint_filter_fn
from torch import nn

from ssl_vit.cli import main as ssl_vit
from ssl_vit.weights import (
    CheckpointError,
    import_checkpoint,
    load_pretrained,
    load_timm,
)

from tolerances import FORWARD, ROUNDING

pytestmark = pytest.mark.skipif(
    not timm.is_model("vit_base_patch16_dinov3_qkvb"), reason="timm without DINOv3 models"
)

KW = {"img_size": 64, "embed_dim": 128, "depth": 2, "num_heads": 2}
"""A 4 x 4 grid of 16-px patches; width 128 at 64 channels a head (the official rule): 2 heads."""
VARIANTS = {
    # name: (timm model, kwargs beyond KW, the official file's qkv bias: masked | zero | none)
    "reg4_qkvb": ("vit_base_patch16_dinov3_qkvb", {}, "masked"),  # dinov3_vits16 / vitl16
    "reg4_distilled": ("vit_base_patch16_dinov3", {}, "zero"),  # vitb16, vith16+: zero biases
    "swiglu": ("vit_base_patch16_dinov3", {"swiglu_mlp": True, "swiglu_align_to": 8}, "none"),
    "no_registers": ("vit_base_patch16_dinov3_qkvb", {"num_reg_tokens": 0}, "masked"),
    "no_layer_scale": ("vit_base_patch16_dinov3", {}, "none"),  # layerscale_init None
}
"""timm builds its DINOv3 models with layer scale always (create_model drops init_values=None):
the model a file without layer scale equals has gammas of 1, which its official file omits."""


def dinov3(variant: str, seed: int = 0) -> nn.Module:
    """The variant's timm model, eval mode, seeded random weights (scales and norms around 1)."""
    name, kw, _ = VARIANTS[variant]
    model = timm.create_model(name, pretrained=False, num_classes=0, **KW | kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if p.ndim == 1 else 0.0))
            if variant == "no_layer_scale" and re.search(r"\.gamma_[12]$", key):
                p.fill_(1.0)
    return model.eval()


OFFICIAL_NAMES = (
    (r"^reg_token$", "storage_tokens"),
    (r"\.gamma_1$", ".ls1.gamma"),
    (r"\.gamma_2$", ".ls2.gamma"),
    (r"\.mlp\.fc1_g\.", ".mlp.w1."),
    (r"\.mlp\.fc1_x\.", ".mlp.w2."),
)
"""timm -> official names, from the layout (DinoVisionTransformer: storage tokens, LayerScale
`ls1`/`ls2.gamma`, SwiGLUFFN `w1` (SiLU-gated) `w2` `w3`)."""


def official_layout(model: nn.Module, bias: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """`model`'s weights as the official DinoVisionTransformer.state_dict() names and holds
    them: the renames above (and SwiGLU's fc2 as `w3`); one packed (3D,) `attn.qkv.bias`
    (`masked`: a random key third, zeroed in effect by `bias_mask` 1/0/1 as mask_k_bias;
    `zero`: all zeros; `none`: no bias); `rope_embed.periods` = base^(2j / (Dh/2)), base 100,
    j < Dh/4; a (1, D) mask token. Written from the official module's layout, not from our
    converter."""
    g = torch.Generator().manual_seed(seed)
    dim = model.embed_dim
    swiglu = "blocks.0.mlp.fc1_g.weight" in model.state_dict()
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith((".q_bias", ".v_bias")):
            continue
        for pattern, new in OFFICIAL_NAMES + (((r"\.mlp\.fc2\.", ".mlp.w3."),) if swiglu else ()):
            key = re.sub(pattern, new, key)
        out[key] = value
    for i, block in enumerate(model.blocks):
        stem = f"blocks.{i}.attn.qkv."
        if bias == "masked":
            k_bias = torch.randn(dim, generator=g)  # stored, masked out by bias_mask
            out[stem + "bias"] = torch.cat([block.attn.q_bias, k_bias, block.attn.v_bias])
            out[stem + "bias_mask"] = torch.cat(
                [torch.ones(dim), torch.zeros(dim), torch.ones(dim)]
            )
        elif bias == "zero":
            out[stem + "bias"] = torch.zeros(3 * dim)
    head_dim = dim // model.blocks[0].attn.num_heads
    out["rope_embed.periods"] = 100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))
    out["mask_token"] = torch.randn(1, dim, generator=g)
    return out


def official_file(variant: str, fmt: str, model: nn.Module) -> dict:
    """A released backbone (`pretrain`: dinov3_vit*16_pretrain_*.pth, the state dict itself), or
    a training checkpoint's `teacher` (backbone.* + dino_head.* + ibot_head.*)."""
    state = official_layout(model, VARIANTS[variant][2])
    if variant == "no_layer_scale":
        state = {k: v for k, v in state.items() if not re.search(r"\.ls[12]\.gamma$", k)}
    if fmt == "pretrain":
        return state
    heads = {"dino_head.mlp.0.weight": torch.randn(8, 4), "ibot_head.mlp.0.weight": torch.ones(1)}
    return {"teacher": {f"backbone.{k}": v for k, v in state.items()} | heads}


def images(h: int = 64, w: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(7))


def max_diff(got: nn.Module, want: nn.Module, h: int = 64, w: int = 64) -> float:
    """max |difference| of the features (B, 1 + R + h*w/256, D): cls, registers, patches, each
    after the final norm."""
    x = images(h, w)
    with torch.no_grad():
        a, b = got.forward_features(x), want.forward_features(x)
    assert a.shape == b.shape == (2, want.num_prefix_tokens + h * w // 256, KW["embed_dim"])
    torch.testing.assert_close(a, b, **FORWARD)
    return (a - b).abs().max().item()


def test_the_fixture_is_the_layout_timm_reads():
    """timm's own DINOv3 converter (eva.checkpoint_filter_fn) reads the fixture back to the same
    features: the inverse map above is the official layout, not ours."""
    model = dinov3("reg4_qkvb")
    other = dinov3("reg4_qkvb", seed=3)
    other.load_state_dict(checkpoint_filter_fn(official_layout(model, "masked"), other))
    assert max_diff(other, model) == 0.0


@pytest.mark.parametrize("fmt", ["pretrain", "teacher"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_dinov3_features_equal_timm(variant, fmt, tmp_path):
    model = dinov3(variant)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth"
    torch.save(official_file(variant, fmt, model), path)
    loaded = load_timm(path)
    name, kw, _ = VARIANTS[variant]
    assert type(loaded) is type(model) and timm.models.get_arch_name(name) == name
    assert loaded.num_prefix_tokens == model.num_prefix_tokens == 1 + kw.get("num_reg_tokens", 4)
    assert max_diff(loaded, model) <= FORWARD["atol"]  # the training size, 4 x 4
    assert max_diff(loaded, model, 48, 80) <= FORWARD["atol"]  # 3 x 5: RoPE, no resampling


def test_the_architecture_is_read_from_the_file(tmp_path):
    """Name and kwargs from the shapes: width, depth, heads (64 channels a head), registers,
    q/v bias (the _qkvb model), SwiGLU and its hidden width, layer scale."""
    seen = {}
    for variant in ("reg4_qkvb", "reg4_distilled", "swiglu", "no_layer_scale"):
        model = dinov3(variant)
        torch.save(official_file(variant, "pretrain", model), tmp_path / f"{variant}.pth")
        out = import_checkpoint(tmp_path / f"{variant}.pth", tmp_path / variant)
        seen[variant] = (out["name"], out["kwargs"])
    base = {"patch_size": 16, "embed_dim": 128, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0}
    mlp = {"num_reg_tokens": 4, "swiglu_mlp": False, "swiglu_align_to": 0}
    assert seen["reg4_qkvb"] == ("vit_base_patch16_dinov3_qkvb", base | mlp)
    assert seen["reg4_distilled"] == ("vit_base_patch16_dinov3", base | mlp)
    swiglu = {"num_reg_tokens": 4, "swiglu_mlp": True, "swiglu_align_to": 8}
    assert seen["swiglu"] == ("vit_base_patch16_dinov3", base | swiglu)
    assert seen["no_layer_scale"] == ("vit_base_patch16_dinov3", base | mlp)  # gammas of 1


def test_import_and_export_round_trip_in_timms_layout(tmp_path, capsys):
    """`ssl-vit import` writes backbone/ in timm's pretrained layout: timm loads it as it is
    (local-dir:), with the official file's features; `ssl-vit export` of that reads it back;
    the command's JSON line names the architecture read from the file."""
    model = dinov3("reg4_qkvb")
    torch.save(official_file("reg4_qkvb", "teacher", model), tmp_path / "teacher.pth")
    run, exported = tmp_path / "run", tmp_path / "exported"
    argv = ["--checkpoint", str(tmp_path / "teacher.pth"), "--output.dir", str(run)]
    assert ssl_vit(["import", *argv]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["name"] == "vit_base_patch16_dinov3_qkvb"
    assert out["params"] == sum(p.numel() for p in model.parameters())
    by_timm = timm.create_model(f"local-dir:{run / 'backbone'}", pretrained=True).eval()
    assert max_diff(by_timm, model) <= FORWARD["atol"]
    assert ssl_vit(["export", "--checkpoint", str(run), "--output.dir", str(exported)]) == 0
    assert max_diff(load_timm(exported), model) == 0.0
    assert max_diff(load_timm(run), model) == 0.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_pretrained_gives_the_backbone_with_timms_features(variant, tmp_path):
    """load_pretrained (--checkpoint, --model.init) builds the Backbone over timm's DINOv3 Eva:
    the features (cls, registers, patches) of the official file's model at two sizes."""
    model = dinov3(variant)
    torch.save(official_file(variant, "pretrain", model), tmp_path / "v3.pth")
    backbone = load_pretrained(tmp_path / "v3.pth").eval()
    assert backbone.name == VARIANTS[variant][0] and backbone.pos_embed is None
    for h, w in [(64, 64), (48, 80)]:
        x = images(h, w)
        with torch.no_grad():
            got, want = backbone(x), model.forward_features(x)
        assert got.num_prefix == model.num_prefix_tokens
        assert (got.tokens - want).abs().max().item() <= ROUNDING["atol"]


def perturbed(state: dict, change: str) -> dict:
    """`state` (official layout, reg4_qkvb or swiglu) with one key or value changed."""
    state = dict(state)
    if change == "drop_ls2":
        del state["blocks.1.ls2.gamma"]
    elif change == "drop_ls_of_a_block":  # not a file without layer scale: no gammas of 1
        del state["blocks.1.ls1.gamma"], state["blocks.1.ls2.gamma"]
    elif change == "unexpected_key":
        state["blocks.0.attn.qkv.lora_A"] = torch.zeros(4, 128)
    elif change == "k_bias_unmasked":
        del state["blocks.0.attn.qkv.bias_mask"]
    elif change == "mask_wrong":
        state["blocks.0.attn.qkv.bias_mask"] = torch.ones(3 * 128)
    elif change == "rope_base":
        state["rope_embed.periods"] = state["rope_embed.periods"] ** 2  # base 10^4, not 100
    elif change == "untied_norm":
        state["cls_norm.weight"] = torch.ones(128)
    elif change == "norm_shape":
        state["norm.weight"] = torch.ones(64)
    return state


@pytest.mark.parametrize(
    "change, message",
    [
        ("drop_ls2", r"missing \(1\):\n    blocks\.1\.gamma_2 \(128,\)"),
        (
            "drop_ls_of_a_block",
            r"missing \(2\):\n    blocks\.1\.gamma_1 \(128,\)\n    blocks\.1\.gamma_2",
        ),
        ("unexpected_key", r"unexpected \(1\):\n    blocks\.0\.attn\.qkv\.lora_A"),
        ("k_bias_unmasked", r"blocks\.0\.attn\.qkv\.bias: a non-zero key bias"),
        ("mask_wrong", r"blocks\.0\.attn\.qkv\.bias_mask: expected ones on the query"),
        ("rope_base", r"rope\.periods \(16,\): its values \[1\.0, 1\.77"),
        ("untied_norm", r"cls_norm\.weight: untied cls and patch norms"),
        ("norm_shape", r"mis-shaped \(1\):\n    norm\.weight checkpoint \(64,\) vs model"),
    ],
)
def test_a_dropped_or_altered_key_is_one_error_naming_it(change, message, tmp_path):
    model = dinov3("reg4_qkvb")
    torch.save(perturbed(official_layout(model, "masked"), change), tmp_path / "v3.pth")
    with pytest.raises(CheckpointError, match=message):
        load_timm(tmp_path / "v3.pth")


@pytest.mark.parametrize(
    "variant, first, second",
    [
        ("reg4_qkvb", "blocks.1.ls1.gamma", "blocks.1.ls2.gamma"),  # same shape: swapped
        ("swiglu", "blocks.0.mlp.w1.weight", "blocks.0.mlp.w2.weight"),  # gate <-> linear
        ("reg4_qkvb", "cls_token", "storage_tokens"),  # cls <-> first register (one value)
    ],
)
def test_a_swapped_value_changes_the_features(variant, first, second, tmp_path):
    """Two same-shaped entries swapped (or a cls token moved to a register) load without error,
    and the features differ by far more than the parity tolerance: the test would see it."""
    model = dinov3(variant)
    state = official_layout(model, VARIANTS[variant][2])
    if second == "storage_tokens":
        regs = state[second].clone()
        state[first], regs[:, 0] = regs[:, :1].clone(), state[first][:, 0]
        state[second] = regs
    else:
        state[first], state[second] = state[second], state[first]
    torch.save(state, tmp_path / "v3.pth")
    with pytest.raises(AssertionError):
        max_diff(load_timm(tmp_path / "v3.pth"), model)
    x = images()
    with torch.no_grad():
        diff = load_timm(tmp_path / "v3.pth").forward_features(x) - model.forward_features(x)
    assert diff.abs().max().item() > 1e-2
