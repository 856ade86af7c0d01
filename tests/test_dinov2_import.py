"""Official DINOv2 checkpoints through the one loader: a timm DINOv2 ViT (layer scale, with and
without registers) written in the official key layout (dinov2/models/vision_transformer.py, as
released in dinov2_vits14[_reg4]_pretrain.pth, and as the `teacher` of a training
teacher_checkpoint.pth, blocks chunked or not) loads to timm's features; another resolution
follows the official interpolate_pos_encoding; `ssl-vit knn` and continued pretraining take it."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from ssl_vit.backbone import Backbone
from ssl_vit.cli import main as ssl_vit
from ssl_vit.cli.knn import main as knn_main
from ssl_vit.cli.visualize import main as visualize
from ssl_vit.config import Config, ModelConfig
from ssl_vit.eval.finetune import FineTuneConfig
from ssl_vit.eval.linear_probe import LinearProbeConfig
from ssl_vit.eval.pretrained import pretrained_backbone
from ssl_vit.methods.init import init_backbone
from ssl_vit.weights import CheckpointError, LoadConfig, load_pretrained, official_interp

from tolerances import FORWARD, ROUNDING

KW = {"img_size": 56, "embed_dim": 32, "depth": 2, "num_heads": 2}
"""A 4 x 4 grid of 14-px patches; width 32 is no standard size, so the heads are given."""
HEADS = ModelConfig(img_size=0, num_heads=2)
NAMES = {0: "vit_small_patch14_dinov2", 4: "vit_small_patch14_reg4_dinov2"}


def dinov2(registers: int, seed: int = 0, **kw) -> nn.Module:
    """timm's DINOv2 ViT, eval mode, seeded random weights (layer scales and norms around 1)."""
    model = timm.create_model(NAMES[registers], pretrained=False, num_classes=0, **KW | kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def official_layout(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """`model`'s weights as DinoVisionTransformer.state_dict() names and holds them: registers
    as `register_tokens`, a cls position in pos_embed (1, 1 + N, D) that the official forward
    adds to `cls_token` (timm's registered ViT has it folded into cls_token), and the (1, D)
    mask token. Written from the official module, not from our converter."""
    state = dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    state["mask_token"] = torch.randn(1, model.embed_dim, generator=g)
    if "reg_token" in state:
        cls_pos = torch.randn(1, 1, model.embed_dim, generator=g)
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - cls_pos
        state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    return state


def official_file(registers: int, fmt: str, model: nn.Module) -> dict:
    """What the official code torch.saves: a released backbone (`pretrain`), or train.py's
    teacher_checkpoint.pth {"teacher": backbone.* + dino_head.* + ibot_head.*}, its blocks
    plain or chunked as under FSDP (block_chunks 2: `blocks.{chunk}.{i}.`, i global)."""
    state = official_layout(model)
    if fmt == "pretrain":
        return state
    if fmt == "teacher_chunked":
        per_chunk = KW["depth"] // 2
        state = {
            (f"blocks.{int(k.split('.')[1]) // per_chunk}.{k[len('blocks.') :]}"
             if k.startswith("blocks.") else k): v
            for k, v in state.items()
        }  # fmt: skip
    heads = {"dino_head.mlp.0.weight": torch.randn(64, 32), "ibot_head.mlp.0.weight": torch.ones(1)}
    return {"teacher": {f"backbone.{k}": v for k, v in state.items()} | heads}


def images(size: int = 56) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))


def max_diff(backbone: Backbone, reference: nn.Module, size: int = 56) -> float:
    x = images(size)
    with torch.no_grad():
        got, want = backbone.eval()(x).tokens, reference.forward_features(x)
    torch.testing.assert_close(got, want, **FORWARD)
    return (got - want).abs().max().item()


@pytest.mark.parametrize("fmt", ["pretrain", "teacher", "teacher_chunked"])
@pytest.mark.parametrize("registers", [0, 4])
def test_official_dinov2_features_equal_timm(registers, fmt, tmp_path):
    model = dinov2(registers)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official_file(registers, fmt, model), path)
    # the fixture is the official layout timm's own converter reads back
    timm_read = dinov2(registers, seed=3)
    timm_read.load_state_dict(checkpoint_filter_fn(official_layout(model), timm_read))
    with torch.no_grad():
        want = model.forward_features(images())
        torch.testing.assert_close(timm_read.forward_features(images()), want, **FORWARD)

    backbone = load_pretrained(path, model=HEADS)
    reg = "reg4_" if registers else ""
    assert backbone.config_dict() == {
        "name": f"vit_base_patch14_{reg}dinov2",  # width 32: sized by the kwargs
        "kwargs": KW | {"patch_size": 14},
    }
    assert backbone.num_prefix_tokens == 1 + registers
    assert backbone.pos_interp == ("antialias" if registers else "offset")
    max_diff(backbone, model)


def official_interpolate(pos: torch.Tensor, h: int, w: int, offset: float, antialias: bool):
    """dinov2/models/vision_transformer.py interpolate_pos_encoding, written out: pos (1, 1 + M*M,
    D) -> (1, 1 + h*w, D), the cls position kept."""
    m = math.isqrt(pos.shape[1] - 1)
    grid = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        sizing = {"scale_factor": ((h + offset) / m, (w + offset) / m)}
    else:
        sizing = {"size": (h, w)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **sizing)
    assert grid.shape[-2:] == (h, w)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


@pytest.mark.parametrize("registers", [0, 4])
def test_another_resolution_follows_the_official_formula(registers, tmp_path):
    """Stored at 6 x 6 patches; built for 8 x 8, and fed 4 x 4 at run time: the positions are
    those of the official model's hub / eval config: offset 0.1 without antialiasing without
    registers, offset 0 with antialiasing with them."""
    model = dinov2(registers, img_size=84)
    official = official_layout(model)
    path = tmp_path / "dinov2.pth"
    torch.save(official, path)
    offset, antialias = (0.0, True) if registers else (0.1, False)
    assert official_interp(path) == ("antialias" if registers else "offset")

    for size, built in ((112, 112), (56, 84)):  # built for the size / resized in the forward
        side = size // 14
        pos = official_interpolate(official["pos_embed"], side, side, offset, antialias)
        backbone = load_pretrained(path, model=ModelConfig(img_size=built, num_heads=2))
        reference = dinov2(registers, img_size=size)
        if registers:  # timm's layout: cls position in cls_token, patch positions only
            cls = official["cls_token"] + pos[:, :1]
            reference.load_state_dict(
                model.state_dict() | {"pos_embed": pos[:, 1:], "cls_token": cls}
            )
        else:
            reference.load_state_dict(model.state_dict() | {"pos_embed": pos})
        if built == size:
            torch.testing.assert_close(backbone.pos_embed, reference.pos_embed, **ROUNDING)
        max_diff(backbone, reference, size)
    # the resize is not the other formula: the test tells them apart
    other = official_interpolate(official["pos_embed"], 8, 8, 0.1 - offset, not antialias)
    assert (
        other - official_interpolate(official["pos_embed"], 8, 8, offset, antialias)
    ).abs().max() > 1e-3


@pytest.mark.parametrize("registers", [0, 4])
def test_an_imported_file_keeps_its_formula(registers, tmp_path, capsys):
    """`ssl-vit import` of an official file records its formula in the export's config.json, and
    every later load at another size takes it, as the file loaded directly does (before: the
    imported directory resized bicubically, 5.8e-2 / 5.3e-2 off on these weights, 7.4e-2 /
    9.1e-2 on the released ones); an `export` of the import keeps it; timm still loads it."""
    official = official_layout(dinov2(registers, img_size=84))
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)
    imported, exported = tmp_path / "imported", tmp_path / "exported"
    argv = ["--checkpoint", str(path), "--output.dir", str(imported), "--load.num_heads", "2"]
    assert ssl_vit(["import", *argv]) == 0
    assert ssl_vit(["export", "--checkpoint", str(imported), "--output.dir", str(exported)]) == 0
    capsys.readouterr()
    formula = "antialias" if registers else "offset"
    for config in (imported / "backbone" / "config.json", exported / "config.json"):
        assert json.loads(config.read_text())["pos_interp"] == formula
    timm.create_model(f"local-dir:{exported}", pretrained=True)

    size = ModelConfig(img_size=112, num_heads=2)
    direct = load_pretrained(path, model=size)
    offset, antialias = (0.0, True) if registers else (0.1, False)
    want = official_interpolate(official["pos_embed"], 8, 8, offset, antialias)
    want = want[:, 1:] if registers else want  # timm's registered layout: patch positions only
    torch.testing.assert_close(direct.pos_embed, want, **ROUNDING)
    x = images(70)  # and 5 x 5 patches at run time
    for later in (imported, exported):
        loaded = load_pretrained(later, model=size)
        assert loaded.pos_interp == formula and torch.equal(loaded.pos_embed, direct.pos_embed)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x).tokens, direct.eval()(x).tokens)
        assert LoadConfig().interp("bicubic", later) == formula  # knn, export, import
    cfg = Config(
        model=ModelConfig(img_size=112, patch_size=14, num_heads=2),
        method=FineTuneConfig(checkpoint=str(imported)),
    )
    assert torch.equal(pretrained_backbone(cfg).pos_embed, direct.pos_embed)  # evaluators


def test_auto_takes_the_files_formula_an_explicit_choice_wins(tmp_path):
    path = tmp_path / "dinov2_reg4.pth"
    torch.save(official_layout(dinov2(4)), path)
    plain = tmp_path / "timm_named.pth"  # timm's own names: no official format
    torch.save(dinov2(4).state_dict(), plain)
    assert LoadConfig().interp("offset", path) == "antialias"
    assert LoadConfig().interp("offset", plain) == "offset"
    assert LoadConfig(pos_interp="bicubic").interp("offset", path) == "bicubic"
    backbone = load_pretrained(plain, model=HEADS)  # timm-named DINOv2: inferred as well
    assert backbone.name == "vit_base_patch14_reg4_dinov2" and backbone.pos_interp == "bicubic"


def test_swiglu_refused_naming_the_key(tmp_path):
    state = official_layout(dinov2(0))
    state["blocks.0.mlp.w12.weight"] = state.pop("blocks.0.mlp.fc1.weight")
    path = tmp_path / "dinov2_vitg14_pretrain.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path, model=HEADS)
    msg = str(e.value)
    assert msg.startswith(f"{path}: blocks.0.mlp.w12.weight: a DINOv2 SwiGLU") and "\n" not in msg


def test_knn_and_continued_pretraining_take_the_official_file(tmp_path, capsys):
    model = dinov2(4)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(official_file(4, "teacher", model), path)
    argv = ["--checkpoint", str(path), "--load.num_heads", "2", "--knn.k", "5,1"]
    argv += ["--knn.batch_size", "16", "--data.synthetic_size", "40", "--data.num_workers", "0"]
    assert knn_main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= result["knn_top1"] <= result["knn_top5"] <= 100

    target = Backbone(NAMES[4], **KW, drop_path_rate=0.1)  # a DINOv2 run's student
    init_backbone(target, str(path))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in target.state_dict().items()
               if k != "cls_token")  # fmt: skip
    torch.testing.assert_close(target.cls_token, model.cls_token, **ROUNDING)


@pytest.mark.parametrize(
    "method", [FineTuneConfig, lambda **kw: LinearProbeConfig(protocol="dino", **kw)]
)
def test_linprobe_and_finetune_take_the_files_formula(method, tmp_path):
    """At another size, fine-tuning (protocol: bicubic) and DINO's linear probe (offset) resize
    a registered DINOv2 file's positions by its own formula (offset 0, antialiased)."""
    official = official_layout(dinov2(4))
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official, path)
    cfg = Config(
        model=ModelConfig(img_size=84, patch_size=14, num_heads=2),
        method=method(checkpoint=str(path)),
    )
    backbone = pretrained_backbone(cfg)
    want = official_interpolate(official["pos_embed"], 6, 6, 0.0, True)[:, 1:]
    assert backbone.pos_interp == "antialias"
    torch.testing.assert_close(backbone.pos_embed, want, **ROUNDING)


def test_visualize_takes_the_official_file(tmp_path, capsys):
    """A standard width (ViT-S: 384, 6 heads), so nothing but the file is given."""
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official_layout(dinov2(4, embed_dim=384, num_heads=6, depth=1, img_size=28)), path)
    out = tmp_path / "attention.png"
    assert visualize(["attention", "--checkpoint", str(path), "--viz.output", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["heads"] == 6 and result["grid"] == [2, 2] and out.stat().st_size > 1000
