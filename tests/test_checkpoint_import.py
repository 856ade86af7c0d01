"""Checkpoint import and export: every official format of REFERENCE.md, built from timm models
with the documented key names and wrappers, loads into a Backbone whose features equal timm's on
the same weights; unsafe pickles are refused; wrong files fail with one clear error."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import tiny
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from timm.models.vision_transformer import Block
from torch import nn

from ssl_vit.backbone import Backbone
from ssl_vit.cli import main
from ssl_vit.config import ModelConfig
from ssl_vit.registry import prepare
from ssl_vit.weights import (
    CheckpointError,
    export_backbone,
    infer_architecture,
    load_classifier,
    load_pretrained,
    save_timm,
)

from tolerances import FORWARD

NAME = "vit_tiny_patch16_224"
KW = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
HEADS = ModelConfig(img_size=0, num_heads=3)
"""Width 48 is no standard ViT size, so the heads are given; every other field is inferred."""


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """`model` in eval mode with seeded random weights, norms included (so a lost norm shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def vit(seed: int = 0, name: str = NAME, **kw) -> nn.Module:
    return perturbed(
        timm.create_model(name, pretrained=False, **{**KW, "num_classes": 0, **kw}), seed
    )


def images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))


def assert_features(backbone: Backbone, reference: nn.Module, size: int = 32) -> None:
    x = images(size)
    with torch.no_grad():
        got, want = backbone.eval()(x).tokens, reference.forward_features(x)
    torch.testing.assert_close(got, want, **FORWARD)


def official_resize(pos: torch.Tensor, side: int, prefix: int = 1) -> torch.Tensor:
    """MAE's util/pos_embed.interpolate_pos_embed and DeiT's main.py, written out: the square
    patch grid bicubic to side x side with no antialiasing, the prefix positions kept."""
    n = int((pos.shape[1] - prefix) ** 0.5)
    grid = pos[:, prefix:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(side, side), mode="bicubic")
    return torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def mae_decoder(dim: int = 48, width: int = 32, patch: int = 8, tokens: int = 17) -> dict:
    """The keys an official `*_full.pth` / visualize checkpoint adds to the encoder's."""
    g = torch.Generator().manual_seed(3)
    state = {
        "mask_token": torch.randn(1, 1, width, generator=g),
        "decoder_pos_embed": torch.randn(1, tokens, width, generator=g),
    }
    state |= prefixed("decoder_embed.", nn.Linear(dim, width).state_dict())
    state |= prefixed("decoder_blocks.0.", Block(width, 2).state_dict())
    state |= prefixed("decoder_norm.", nn.LayerNorm(width).state_dict())
    return state | prefixed("decoder_pred.", nn.Linear(width, patch * patch * 3).state_dict())


def dino_head(dim: int = 48, hidden: int = 64, bottleneck: int = 16, out: int = 100) -> dict:
    """DINOHead keys: mlp.{0,2,4} linears, weight-normalised last layer."""
    state = {}
    for i, (a, b) in zip(
        (0, 2, 4), ((dim, hidden), (hidden, hidden), (hidden, bottleneck)), strict=True
    ):
        state |= prefixed(f"mlp.{i}.", nn.Linear(a, b).state_dict())
    return state | {
        "last_layer.weight_g": torch.ones(out, 1),
        "last_layer.weight_v": torch.randn(out, bottleneck),
    }


TRAIN_ARGS = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, blr=1.5e-4)
OPTIMIZER = {
    "state": {0: {"step": torch.tensor(3.0)}},
    "param_groups": [{"lr": 1e-4, "params": [0]}],
}


def official(fmt: str) -> tuple[object, nn.Module, str]:
    """(object the official code torch.saves, timm model holding the backbone's weights, which)."""
    teacher, student = vit(0), vit(1)
    enc = teacher.state_dict()
    if fmt == "mae_pretrain":  # mae_pretrain_vit_*.pth
        return {"model": enc}, teacher, "teacher"
    if fmt == "mae_full":  # *_full.pth and mae_visualize_*.pth: encoder + mask token + decoder
        return {"model": enc | mae_decoder()}, teacher, "teacher"
    if fmt == "mae_training":  # checkpoint-*.pth of main_pretrain.py
        scaler = {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 10}
        obj = {"model": enc, "optimizer": OPTIMIZER, "epoch": 799, "scaler": scaler}
        return obj | {"args": TRAIN_ARGS}, teacher, "teacher"
    if fmt == "dino_pretrain":  # dino_*_pretrain.pth: the teacher backbone, no prefix
        return enc, teacher, "teacher"
    if fmt in ("dino_training", "dino_training_student"):  # checkpoint.pth of main_dino.py
        obj = {
            "student": prefixed("module.backbone.", student.state_dict())
            | prefixed("module.head.", dino_head()),
            "teacher": prefixed("backbone.", enc) | prefixed("head.", dino_head()),
            "optimizer": OPTIMIZER,
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536),
            "dino_loss": {"center": torch.zeros(1, 100)},
        }
        if fmt == "dino_training":
            return obj, teacher, "teacher"
        return obj, student, "student"
    if fmt == "deit":  # deit_*_patch16_224.pth: timm names with the classifier head
        deit = perturbed(timm.create_model("deit_tiny_patch16_224", **KW, num_classes=10), 2)
        reference = vit()
        reference.load_state_dict({k: v for k, v in deit.state_dict().items() if "head" not in k})
        return {"model": deit.state_dict()}, reference, "teacher"
    raise AssertionError(fmt)


@pytest.mark.parametrize(
    "fmt",
    [
        "mae_pretrain",
        "mae_full",
        "mae_training",
        "dino_pretrain",
        "dino_training",
        "dino_training_student",
        "deit",
    ],
)
def test_official_format_features_equal_timm(fmt, tmp_path):
    obj, reference, which = official(fmt)
    path = tmp_path / f"{fmt}.pth"
    torch.save(obj, path)
    backbone = load_pretrained(path, model=HEADS, which=which)
    assert backbone.config_dict() == {"name": "vit_base_patch8_224", "kwargs": KW}
    assert_features(backbone, reference)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # only while loading


def test_deit_distilled_keeps_its_dist_token_and_its_position(tmp_path):
    """The distilled network is the one evaluated: timm's deit_*_distilled, heads dropped."""
    deit = perturbed(timm.create_model("deit_tiny_distilled_patch16_224", **KW, num_classes=10), 4)
    state = deit.state_dict()
    assert state["pos_embed"].shape == (1, 16 + 2, 48)
    torch.save({"model": state}, tmp_path / "deit_distilled.pth")
    backbone = load_pretrained(tmp_path / "deit_distilled.pth", model=HEADS)
    assert backbone.config_dict()["name"] == "deit_base_distilled_patch16_224"  # width 48: sized
    assert backbone.num_prefix_tokens == 2 and torch.equal(backbone.pos_embed, state["pos_embed"])
    assert torch.equal(backbone.dist_token, state["dist_token"])
    assert not any("head" in k for k in backbone.state_dict())
    assert_features(backbone, deit)  # cls, dist, patches: timm's forward_features


def test_timm_name_with_local_weights(tmp_path):
    """NAME=PATH: the tag is dropped, a distilled name builds the distilled ViT; weights in
    safetensors with timm's classifier head."""
    model = vit(5, num_classes=10)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    sized = ModelConfig(img_size=32, **{k: v for k, v in KW.items() if k != "img_size"})
    backbone = load_pretrained(f"{NAME}.augreg_in21k={tmp_path / 'w.safetensors'}", model=sized)
    assert backbone.config_dict() == {"name": NAME, "kwargs": KW}
    reference = vit()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "head" not in k})
    assert_features(backbone, reference)

    deit = perturbed(timm.create_model("deit_tiny_distilled_patch16_224", **KW, num_classes=10), 6)
    torch.save({"model": deit.state_dict()}, tmp_path / "d.pth")
    backbone = load_pretrained(f"deit_tiny_distilled_patch16_224={tmp_path / 'd.pth'}", model=sized)
    assert backbone.name == "deit_tiny_distilled_patch16_224" and backbone.num_prefix_tokens == 2
    assert_features(backbone, deit)


def test_run_directory_timm_directory_and_earlier_exports(tmp_path):
    """A run directory, its backbone/ (timm's layout), the weights file in it, and an earlier
    version's backbone.safetensors + backbone.json all load the same backbone."""
    backbone = Backbone(NAME, **KW)
    perturbed(backbone, 8)
    export_backbone(backbone, tmp_path / "run")
    old = tmp_path / "old"  # an earlier version's export
    old.mkdir()
    save_file(backbone.state_dict(), str(old / "backbone.safetensors"))
    (old / "backbone.json").write_text(json.dumps(backbone.config_dict()))
    reference = backbone.to_timm().eval()
    run = tmp_path / "run"
    for checkpoint in (run, run / "backbone", run / "backbone" / "model.safetensors", old):
        loaded = load_pretrained(checkpoint)
        assert loaded.name == NAME and loaded.timm_kwargs.items() >= KW.items()
        assert_features(loaded, reference)
    assert_features(load_pretrained(old / "backbone.safetensors"), reference)


def test_timm_save_for_hf_folder_with_pytorch_model_bin(tmp_path):
    """timm's save_for_hf writes pytorch_model.bin unless asked for safetensors, as many Hub
    repositories hold (before: `a directory without backbone/`, rc 2, at --checkpoint and
    --model.init): read with weights_only=True, as timm reads it. The folder, its .bin, a
    classifier saved so and continued pretraining take it; a pickled object in it is refused
    unrun."""
    model = vit(13)
    save_for_hf(model, str(tmp_path / "hf"), model_args=KW)  # width 48: heads from the JSON
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "pytorch_model.bin"
    ]  # fmt: skip
    for checkpoint in (tmp_path / "hf", tmp_path / "hf" / "pytorch_model.bin"):
        loaded = load_pretrained(checkpoint)
        assert loaded.name == NAME and loaded.timm_kwargs.items() >= KW.items()
        assert_features(loaded, model)
    classifier = perturbed(timm.create_model(NAME, **KW, num_classes=5), 14)
    save_for_hf(classifier, str(tmp_path / "clf"), model_args={**KW, "num_classes": 5})
    with torch.no_grad():
        assert torch.equal(load_classifier(tmp_path / "clf")(images()), classifier(images()))
    cfg = tiny(tmp_path / "run")
    cfg.model = ModelConfig(img_size=32, init=str(tmp_path / "hf"))
    prepare(cfg)  # continued pretraining: the architecture of the folder
    assert (cfg.model.name, cfg.model.embed_dim, cfg.model.num_heads) == (NAME, 48, 3)

    target = tmp_path / "target.txt"
    torch.save({"w": WritesFile(target)}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused"):
        load_pretrained(tmp_path / "hf")
    assert not target.exists()


@pytest.mark.parametrize(
    "dim,size,heads,patch",
    [(192, "tiny", 3, 16), (384, "small", 6, 8), (768, "base", 12, 16), (1024, "large", 16, 16)]
    + [(1280, "huge", 16, 14)],
)
def test_infer_architecture_standard_sizes(dim, size, heads, patch):
    with torch.device("meta"):  # shapes only
        model = timm.create_model(
            "vit_base_patch16_224", num_classes=0, img_size=4 * patch, patch_size=patch,
            embed_dim=dim, depth=3, num_heads=heads,
        )  # fmt: skip
    name, kwargs = infer_architecture(model.state_dict())
    assert name == f"vit_{size}_patch{patch}_224"
    assert kwargs == dict(
        img_size=4 * patch, patch_size=patch, embed_dim=dim, depth=3, num_heads=heads
    )


def test_infer_architecture_nonstandard_mlp_and_bias_end_to_end(tmp_path):
    model = vit(9, embed_dim=192, num_heads=3, mlp_ratio=2.0, qkv_bias=False)
    torch.save({"model": model.state_dict()}, tmp_path / "m.pth")
    backbone = load_pretrained(tmp_path / "m.pth")  # width 192: ViT-Ti heads, nothing given
    assert backbone.config_dict() == {
        "name": "vit_base_patch16_224",  # no vit_tiny_patch8_224 in timm: sizes are kwargs
        "kwargs": {**KW, "embed_dim": 192, "mlp_ratio": 2.0, "qkv_bias": False},
    }
    assert_features(backbone, model)


def test_pos_embed_resampled_to_another_image_size(tmp_path):
    model = vit(10)
    torch.save({"model": model.state_dict()}, tmp_path / "mae.pth")
    backbone = load_pretrained(tmp_path / "mae.pth", model=ModelConfig(img_size=64, num_heads=3))
    assert backbone.grid_size == (8, 8) and backbone.timm_kwargs["img_size"] == 64
    want = official_resize(model.pos_embed.detach(), 8)  # MAE's and DeiT's loaders
    torch.testing.assert_close(backbone.pos_embed.detach(), want, rtol=0, atol=1e-6)
    reference = vit(img_size=64)
    reference.load_state_dict(model.state_dict() | {"pos_embed": want})
    assert_features(backbone, reference, size=64)


class WritesFile:
    """A pickled object that writes `target` when unpickled (torch.load(weights_only=False))."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return exec, (f"open({str(self.target)!r}, 'w').write('pwned')",)


def test_malicious_pickle_refused_and_never_run(tmp_path, capsys):
    # Positive control: the payload is live when fully unpickled.
    control = tmp_path / "control.txt"
    torch.save({"model": vit().state_dict(), "args": WritesFile(control)}, tmp_path / "c.pth")
    torch.load(tmp_path / "c.pth", weights_only=False)
    assert control.read_text() == "pwned"

    target = tmp_path / "target.txt"
    evil = tmp_path / "checkpoint-799.pth"  # disguised as an MAE training checkpoint
    torch.save({"model": vit().state_dict(), "args": WritesFile(target)}, evil)
    with pytest.raises(CheckpointError, match="refused") as e:
        load_pretrained(evil, model=HEADS)
    assert str(evil) in str(e.value) and "exec" in str(e.value)
    assert not target.exists()
    with pytest.raises(CheckpointError, match="refused"):  # as a (DeiT teacher) classifier
        load_classifier(f"{NAME}={evil}")
    assert not target.exists()

    out = tmp_path / "imported"
    assert main(["import", "--checkpoint", str(evil), "--output.dir", str(out)]) == 2
    assert "refused" in capsys.readouterr().err
    assert not target.exists() and not (out / "backbone").exists()


def test_wrong_checkpoint_lists_missing_unexpected_misshaped_and_top_keys(tmp_path):
    state = {k: v for k, v in vit().state_dict().items() if not k.startswith("blocks.")}
    state |= {"extra.weight": torch.zeros(3, 4), "norm.weight": torch.ones(40)}
    state["cls_token"] = torch.zeros(1, 1, 40)
    path = tmp_path / "wrong.pth"
    torch.save({"model": state, "epoch": 5}, path)
    sized = ModelConfig(img_size=32, **{k: v for k, v in KW.items() if k != "img_size"})
    with pytest.raises(CheckpointError) as e:
        load_pretrained(f"{NAME}={path}", model=sized)
    msg = str(e.value)
    assert msg.startswith(f"{path}: does not fit {NAME}")
    assert "missing (24):\n    blocks.0.norm1.weight (48,)" in msg
    assert "blocks.0.attn.qkv.weight (144, 48)" in msg and "... and 4 more" in msg
    assert "unexpected (1):\n    extra.weight (3, 4)" in msg
    assert "mis-shaped (2):" in msg
    assert "cls_token checkpoint (1, 1, 40) vs model (1, 1, 48)" in msg
    assert "norm.weight checkpoint (40,) vs model (48,)" in msg
    assert msg.endswith("the file's top-level keys: ['model', 'epoch']")

    # One missing tensor is never left at its random initialisation.
    state = vit().state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"missing \(1\):\n    blocks.1.mlp.fc2.bias \(48,\)"):
        load_pretrained(path, model=HEADS)


def test_unusable_inputs_fail_naming_the_path(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(
        torch.randint(0, 256, (999,), dtype=torch.uint8).numpy().tobytes()
    )
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, tmp_path / "resnet.pth")
    torch.save({"model": vit().state_dict()}, tmp_path / "mae.pth")
    (tmp_path / "empty_dir").mkdir()
    cases = {
        str(tmp_path / "nope.pth"): "not found",
        str(tmp_path / "empty_dir"): "a directory without backbone/",
        str(tmp_path / "garbage.pth"): "not a readable PyTorch or safetensors checkpoint",
        str(tmp_path / "empty.pth"): "not a readable PyTorch or safetensors checkpoint",
        str(tmp_path / "bad.safetensors"): "not a readable PyTorch or safetensors checkpoint",
        str(tmp_path / "resnet.pth"): "cannot infer a ViT architecture",
        f"{NAME}={tmp_path / 'missing.pth'}": "not found",
    }
    for checkpoint, why in cases.items():
        with pytest.raises(CheckpointError, match=why) as e:
            load_pretrained(checkpoint)
        assert checkpoint.rpartition("=")[2] in str(e.value)
    with pytest.raises(CheckpointError, match=r"vit_small_patch16_224.dino=PATH \(nothing is"):
        load_pretrained("vit_small_patch16_224.dino")
    with pytest.raises(CheckpointError, match="mae.pth: no 'student' network"):
        load_pretrained(tmp_path / "mae.pth", model=HEADS, which="student")
    with pytest.raises(CheckpointError, match="mae.pth: width 48 is no standard ViT size"):
        load_pretrained(tmp_path / "mae.pth")


def json_line(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def test_export_is_timms_own_layout_then_import_round_trip_bit_exact(tmp_path, capsys):
    """An export with non-default kwargs is a timm pretrained directory: timm.create_model(
    "local-dir:DIR", pretrained=True) builds it with those kwargs and its features equal ours."""
    backbone = Backbone(NAME, **KW, drop_path_rate=0.1)
    perturbed(backbone, 11)
    run = tmp_path / "run"
    export_backbone(backbone, run)

    out = tmp_path / "export" / "vit_tiny_mae"
    assert main(["export", "--checkpoint", str(run), "--output.dir", str(out)]) == 0
    line = json_line(capsys)
    assert line["exported"] == "backbone" and line["dir"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == NAME and config["num_classes"] == 0
    assert config["model_args"].items() >= {"patch_size": 8, "drop_path_rate": 0.1}.items()
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model.patch_embed.patch_size == (8, 8) and model.embed_dim == 48
    x = images()
    with torch.no_grad():
        diff = (backbone.eval()(x).tokens - model.forward_features(x)).abs().max()
    assert diff == 0

    imported = tmp_path / "imported"
    assert main(["import", "--checkpoint", str(out), "--output.dir", str(imported)]) == 0
    assert json_line(capsys)["dir"] == str(imported / "backbone")
    original = backbone.state_dict()
    back = load_file(str(imported / "backbone" / "model.safetensors"))
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert load_pretrained(imported).timm_kwargs.items() >= backbone.timm_kwargs.items()

    assert main(["import", "--checkpoint", str(out), "--output.dir", str(imported)]) == 2
    assert "already holds backbone/" in capsys.readouterr().err


def test_export_classifier_of_a_run(tmp_path, capsys):
    """A run that trained a (distilled) classifier exports it whole; importing the export takes
    its backbone."""
    run = tmp_path / "run"
    export_backbone(Backbone(NAME, **KW), run)
    name, kwargs = "deit_tiny_distilled_patch16_224", {**KW, "num_classes": 10}
    classifier = perturbed(timm.create_model(name, **kwargs), 12)
    save_timm(classifier.state_dict(), name, kwargs, run / "classifier")
    out = tmp_path / "clf"
    assert main(["export", "--checkpoint", str(run), "--output.dir", str(out)]) == 0
    assert json_line(capsys)["exported"] == "classifier"
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(images()), classifier(images()))
        # the run and its export are classifiers a DeiT teacher can be loaded from
        for loaded in (load_classifier(run, num_classes=10), load_classifier(out)):
            assert torch.equal(loaded(images()), classifier(images()))

    backbone = load_pretrained(out)  # the distilled network, its token kept
    assert backbone.name == name and backbone.timm_kwargs.items() >= KW.items()
    assert torch.equal(backbone.pos_embed.detach(), classifier.pos_embed.detach())
    assert torch.equal(backbone.blocks[1].mlp.fc2.weight, classifier.blocks[1].mlp.fc2.weight)
    assert_features(backbone, classifier)


def test_import_command_dino_student_at_new_size(tmp_path, capsys):
    obj, student, _ = official("dino_training_student")
    torch.save(obj, tmp_path / "checkpoint.pth")
    out = tmp_path / "dino_student"
    argv = ["import", "--checkpoint", str(tmp_path / "checkpoint.pth"), "--output.dir", str(out)]
    argv += ["--load.which", "student", "--load.num_heads", "3", "--load.img_size", "48"]
    assert main(argv) == 0
    line = json_line(capsys)
    assert line["kwargs"] == {**KW, "img_size": 48}
    reference = vit(img_size=48)
    pos = official_resize(student.pos_embed.detach(), 6)  # import's default: MAE's, DeiT's
    reference.load_state_dict(student.state_dict() | {"pos_embed": pos})
    assert_features(load_pretrained(out), reference, size=48)
