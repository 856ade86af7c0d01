import json
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from ssl_vit.backbone import Backbone, resample_pos_embed

from tolerances import FORWARD, ROUNDING

NAME = "vit_tiny_patch16_224"
KW = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3}


def make() -> tuple[Backbone, torch.nn.Module]:
    """A backbone and a timm model holding the same (random) weights, both in eval mode."""
    torch.manual_seed(0)
    backbone = Backbone(NAME, **KW).eval()
    with torch.no_grad():  # make the norms non-trivial so a missing/extra norm is visible
        for name, param in backbone.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    model = timm.create_model(NAME, pretrained=False, num_classes=0, **KW).eval()
    model.load_state_dict(backbone.state_dict(), strict=True)
    return backbone, model


def images(b=2, h=32, w=32, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_full_forward_equals_timm_forward_features():
    backbone, model = make()
    x = images()
    out = backbone(x)
    assert out.tokens.shape == (2, 1 + 64, 48) and out.num_prefix == 1
    assert out.layers == [] and out.attn is None
    torch.testing.assert_close(out.tokens, model.forward_features(x), **FORWARD)
    assert (backbone.embed_dim, backbone.num_heads, backbone.depth) == (48, 3, 2)
    assert (backbone.patch_size, backbone.grid_size, backbone.num_patches) == (4, (8, 8), 64)
    assert backbone.num_prefix_tokens == 1 and backbone.in_chans == 3


def test_kept_tokens_all_kept_equals_full_path():
    backbone, _ = make()
    x = images()
    full = backbone(x).tokens
    ids = torch.arange(64).expand(2, 64)
    torch.testing.assert_close(backbone(x, ids_keep=ids).tokens, full, **FORWARD)
    # A per-sample random permutation: attention is permutation-equivariant, so un-permuting the
    # patch tokens gives the full path back, and cls is unchanged.
    g = torch.Generator().manual_seed(3)
    perm = torch.stack([torch.randperm(64, generator=g) for _ in range(2)])
    out = backbone(x, ids_keep=perm).tokens
    unperm = torch.empty_like(out[:, 1:])
    unperm.scatter_(1, perm.unsqueeze(-1).expand(-1, -1, 48), out[:, 1:])
    torch.testing.assert_close(unperm, full[:, 1:], **FORWARD)
    torch.testing.assert_close(out[:, 0], full[:, 0], **FORWARD)


def test_kept_subset_equals_timm_modules_on_gathered_tokens():
    backbone, model = make()
    x = images()
    ids = torch.tensor([[0, 9, 63, 17], [5, 4, 3, 40]])
    out = backbone(x, ids_keep=ids)
    # Independent: timm's own embedding, gather row-major positions after the position embedding.
    with torch.no_grad():
        tokens = model.patch_embed(x) + model.pos_embed[:, 1:]
        kept = torch.stack([tokens[i, ids[i]] for i in range(2)])
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1)
        ref = model.norm(model.blocks(torch.cat([cls, kept], dim=1)))
    assert out.tokens.shape == (2, 5, 48)
    torch.testing.assert_close(out.tokens, ref, **FORWARD)


def test_state_dict_round_trip_with_timm():
    backbone, model = make()
    assert list(backbone.state_dict()) == list(model.state_dict())
    other = Backbone(NAME, **KW).eval()
    other.load_state_dict(model.state_dict(), strict=True)
    x = images()
    torch.testing.assert_close(other(x).tokens, model.forward_features(x), **FORWARD)
    exported = backbone.to_timm().eval()
    torch.testing.assert_close(exported.forward_features(x), backbone(x).tokens, **FORWARD)
    config = json.loads(json.dumps(backbone.config_dict()))
    assert config == {"name": NAME, "kwargs": KW}
    assert backbone.no_weight_decay() == {"pos_embed", "cls_token"}


def test_register_tokens_adopted():
    kw = {**KW, "reg_tokens": 2}
    backbone = Backbone(NAME, **kw).eval()
    model = timm.create_model(NAME, num_classes=0, **kw).eval()
    model.load_state_dict(backbone.state_dict(), strict=True)
    x = images()
    out = backbone(x)
    assert out.num_prefix == 3 and backbone.no_weight_decay() == {
        "pos_embed",
        "cls_token",
        "reg_token",
    }
    torch.testing.assert_close(out.tokens, model.forward_features(x), **FORWARD)


def test_other_resolutions_resample_position_embedding():
    backbone, model = make()
    # Square 48 px: a timm model built at 48 px holding the bicubic-resampled position embedding.
    state = dict(backbone.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (12, 12), (8, 8), 1)
    big = timm.create_model(NAME, num_classes=0, **{**KW, "img_size": 48}).eval()
    big.load_state_dict(state, strict=True)
    x = images(h=48, w=48)
    out = backbone(x)
    assert out.tokens.shape == (2, 1 + 144, 48)
    torch.testing.assert_close(out.tokens, big.forward_features(x), **FORWARD)
    # Non-square 32 x 48: timm's dynamic_img_size path.
    dyn = timm.create_model(NAME, num_classes=0, dynamic_img_size=True, **KW).eval()
    dyn.load_state_dict(backbone.state_dict(), strict=True)
    x = images(h=32, w=48)
    torch.testing.assert_close(backbone(x).tokens, dyn.forward_features(x), **FORWARD)
    assert not torch.allclose(backbone.pos_embed[:, 1:], state["pos_embed"][:, 1:65])


def test_last_layers_equal_hooks_on_timm_blocks():
    backbone, model = make()
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: seen.append(o))
    x = images()
    with torch.no_grad():
        final = model.forward_features(x)
        ref = [model.norm(o) for o in seen]
    out = backbone(x, n_last=2)
    assert len(out.layers) == 2
    for got, want in zip(out.layers, ref, strict=True):
        torch.testing.assert_close(got, want, **FORWARD)
    torch.testing.assert_close(out.tokens, final, **FORWARD)
    one = backbone(x, n_last=1).layers
    assert len(one) == 1
    torch.testing.assert_close(one[0], ref[-1], **FORWARD)
    assert not torch.allclose(ref[0], ref[1])


def test_attention_probabilities_equal_eager_timm_softmax():
    backbone, model = make()
    last = model.blocks[-1].attn
    last.fused_attn = False  # timm's eager path materialises the softmax; capture it
    captured = []
    last.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o))
    x = images()
    with torch.no_grad():
        model.forward_features(x)
    out = backbone(x, return_attn=True)
    assert out.attn.shape == (2, 3, 65, 65)
    # each row sums 65 probabilities: up to 65 roundings of O(1/65) terms
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(2, 3, 65), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.attn, captured[0], **ROUNDING)
    # tokens: only the last block's attention kernel differs (explicit softmax for the maps)
    torch.testing.assert_close(out.tokens, backbone(x).tokens, **ROUNDING)


def test_extra_prefix_token_reaches_blocks_after_cls():
    backbone, _ = make()
    seen = []
    backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = images()
    plain = backbone(x)
    extra = torch.randn(2, 1, 48, generator=torch.Generator().manual_seed(7))
    out = backbone(x, prefix=extra)
    assert out.num_prefix == 2 and out.tokens.shape == (2, 2 + 64, 48)
    before, after = seen
    assert torch.equal(after[:, 1:2], extra)
    assert torch.equal(after[:, :1], before[:, :1])  # cls + its position embedding
    assert torch.equal(after[:, 2:], before[:, 1:])  # patch tokens unchanged
    assert not torch.allclose(out.tokens[:, 0], plain.tokens[:, 0], atol=1e-3)  # moved by O(0.1)


def test_backbone_source_knows_no_methods():
    source = Path(sys.modules[Backbone.__module__].__file__).read_text()
    assert re.findall(r"mae|dino|deit", source, flags=re.IGNORECASE) == []


def test_rejects_unserialisable_kwargs():
    with pytest.raises(ValueError, match="JSON"):
        Backbone(NAME, **KW, act_layer=torch.nn.GELU)


def saved_activation_bytes(backbone: Backbone, x: torch.Tensor, n_last: int) -> tuple[int, dict]:
    """Bytes of the non-parameter tensors autograd keeps for backward during one forward (what
    activation checkpointing saves), and the parameters' gradients after a backward."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = backbone(x, n_last=n_last)
    params = {p.untyped_storage().data_ptr() for p in backbone.parameters()}
    (out.tokens.square().mean() + out.layers[0].mean()).backward()
    grads = {n: p.grad for n, p in backbone.named_parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in params), grads


def test_grad_checkpointing_same_gradients_less_saved_activations():
    kw = {**KW, "depth": 4, "drop_path_rate": 0.2}  # drop path: recomputation redraws the same
    x = images(b=4)
    runs = []
    for on in (False, True):
        torch.manual_seed(0)
        backbone = Backbone(NAME, **kw).train()
        backbone.set_grad_checkpointing(on)
        torch.manual_seed(1)
        runs.append(saved_activation_bytes(backbone, x, n_last=2))
    (plain_bytes, plain), (ckpt_bytes, ckpt) = runs
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0)
    # only the block inputs and the non-block layers stay: 4 blocks of 65 tokens x 48 channels
    assert ckpt_bytes < plain_bytes / 4, (plain_bytes, ckpt_bytes)
    with torch.no_grad():  # nothing recorded (evaluation): the plain path
        on = backbone.eval()(x).tokens
        backbone.set_grad_checkpointing(False)
        assert torch.equal(on, backbone(x).tokens)


def test_position_embedding_resampling_formulas():
    """resample_pos_embed's three formulas against their definitions (DINO's own in
    test_fidelity.py); the choice is the caller's at run time, not part of backbone.json."""
    pos = torch.randn(1, 1 + 64, 48, generator=torch.Generator().manual_seed(0))
    assert resample_pos_embed(pos, (8, 8), (8, 8), 1, "offset") is pos  # the same grid: as is
    want = resample_abs_pos_embed(pos, (12, 6), (8, 8), num_prefix_tokens=1)
    assert torch.equal(resample_pos_embed(pos, (12, 6), (8, 8), 1, "antialias"), want)
    grid = pos[:, 1:].reshape(1, 8, 8, 48).permute(0, 3, 1, 2)
    for mode, kw in (
        ("bicubic", dict(size=(12, 6))),
        ("offset", dict(scale_factor=(1.5125, 0.7625))),
    ):
        out = F.interpolate(grid, mode="bicubic", **kw).permute(0, 2, 3, 1).reshape(1, 72, 48)
        got = resample_pos_embed(pos, (12, 6), (8, 8), 1, mode)
        torch.testing.assert_close(got, torch.cat([pos[:, :1], out], dim=1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown mode 'nearest'"):
        resample_pos_embed(pos, (12, 6), (8, 8), 1, "nearest")
    backbone = Backbone(NAME, pos_interp="offset", **KW)
    assert backbone.pos_interp == "offset" and backbone.config_dict() == {
        "name": NAME,
        "kwargs": KW,
    }
    x = images(h=48, w=48)
    with torch.no_grad():
        offset = backbone(x).tokens
        backbone.pos_interp = "bicubic"
        assert (backbone(x).tokens - offset).abs().max() > 1e-3  # the formula reaches the forward
