"""`ssl-vit knn` takes every checkpoint format `load_pretrained` reads: an official DINO training
checkpoint (teacher or student network) and a NAME=PATH timm file give the same features and
accuracy as our run directory of the same weights; an interrupted run is evaluated (and exported)
from its checkpoints."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import tiny, train_until_killed
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_vit.backbone import Backbone
from ssl_vit.cli import main as ssl_vit
from ssl_vit.cli.knn import main
from ssl_vit.config import Config, ModelConfig
from ssl_vit.eval.knn import embed
from ssl_vit.registry import build_method, method_configs
from ssl_vit.train.checkpoint import check_checkpoint
from ssl_vit.weights import export_backbone, import_checkpoint, latest_checkpoint, load_pretrained

from tolerances import FORWARD

NAME = "vit_tiny_patch16_224"
KW = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
"""Width 48 is no standard ViT size: an official file needs --load.num_heads 3."""
ARGS = ["--knn.k", "5,1", "--knn.batch_size", "16"]
ARGS += ["--data.synthetic_size", "60", "--data.num_workers", "0"]


def vit(seed: int, name: str = NAME, **kw) -> nn.Module:
    """A timm ViT (no head) in eval mode with seeded random weights, norms included."""
    model = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def knn(capsys, checkpoint: str, *extra: str) -> dict:
    assert main([*ARGS, "--checkpoint", checkpoint, *extra]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def metrics(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "checkpoint"}


def test_official_dino_checkpoint_equals_our_run_directory(tmp_path, capsys):
    teacher, student = vit(0, **KW), vit(1, **KW)
    head = {"mlp.0.weight": torch.randn(64, 48), "last_layer.weight_v": torch.randn(100, 64)}
    official = tmp_path / "dino" / "checkpoint.pth"  # main_dino.py's checkpoint (REFERENCE.md)
    official.parent.mkdir()
    torch.save(
        {
            "student": prefixed("module.backbone.", student.state_dict())
            | prefixed("module.head.", head),
            "teacher": prefixed("backbone.", teacher.state_dict()) | prefixed("head.", head),
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=100),
            "dino_loss": {"center": torch.zeros(1, 100)},
        },
        official,
    )
    run = tmp_path / "run"
    run.mkdir()
    ours = Backbone(NAME, **KW)
    ours.load_state_dict(teacher.state_dict())
    export_backbone(ours, run)

    # the features knn reads: those of timm's teacher, whichever form holds its weights
    heads = ModelConfig(img_size=0, num_heads=3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    accelerator = Accelerator(cpu=True)
    with torch.no_grad():
        want = F.normalize(teacher.forward_features(x)[:, 0], dim=-1)
        got_official = embed(load_pretrained(official, model=heads).eval(), x, accelerator)
        got_run = embed(load_pretrained(run).eval(), x, accelerator)
        got_student = embed(
            load_pretrained(official, model=heads, which="student").eval(), x, accelerator
        )
        want_student = F.normalize(student.forward_features(x)[:, 0], dim=-1)
    torch.testing.assert_close(got_official, want, **FORWARD)
    assert torch.equal(got_official, got_run)
    torch.testing.assert_close(got_student, want_student, **FORWARD)
    assert (got_student - got_official).abs().max() > 0.1

    from_run = knn(capsys, str(run))
    from_official = knn(capsys, str(official), "--load.num_heads", "3")
    assert from_official["checkpoint"] == str(official)
    assert metrics(from_official) == metrics(from_run)
    assert set(metrics(from_run)) == {
        "k", "knn_top1", "knn_top5", "knn_top1_k1", "knn_top5_k1", "eval_split", "held_out"
    }  # fmt: skip
    assert (from_run["eval_split"], from_run["held_out"]) == ("val", True)
    assert from_run["knn_top5"] > from_run["knn_top1"] > 0  # a real measurement, not all 0
    assert json.loads((official.parent / "knn.json").read_text()) == from_official
    assert json.loads((run / "knn.json").read_text()) == from_run


def test_name_equals_path_and_errors(tmp_path, capsys):
    weights = tmp_path / "vit.safetensors"  # a timm-named state dict without any JSON
    save_file(vit(3, "test_vit").state_dict(), str(weights))
    named = f"test_vit={weights}"
    import_checkpoint(named, tmp_path / "imported")  # our run-like directory of those weights
    sized = ["--knn.img_size", "32"]
    from_named = knn(capsys, named, *sized)
    assert metrics(from_named) == metrics(knn(capsys, str(tmp_path / "imported"), *sized))
    assert json.loads((tmp_path / "knn.json").read_text()) == from_named  # beside the file

    assert main([*ARGS, "--checkpoint", str(tmp_path / "nope.pth"), "--knn.k", "0"]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint: {tmp_path / 'nope.pth'}: not found" in err and "knn.k: each" in err
    assert main([*ARGS, "--checkpoint", str(weights), "--load.num_heads", "-1"]) == 2
    assert "load.num_heads: must be >= 0" in capsys.readouterr().err
    # a file without its architecture: the error comes from the loader and names the file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    assert main([*ARGS, "--checkpoint", str(tmp_path / "odd.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "odd.safetensors: cannot infer a ViT architecture" in err


def exported_at(folder: Path) -> Backbone:
    """The backbone a run exports at checkpoint `folder`: its method rebuilt from the folder's
    config, its whole saved state loaded strictly, `export_backbone()` (DINO's teacher)."""
    cfg = Config.from_dict(json.loads((folder / "config.json").read_text()), method_configs())
    method = build_method(cfg, init=False)
    method.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return method.export_backbone().eval()


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_an_interrupted_run_is_evaluated_and_exported_from_its_checkpoints(
    method, tmp_path, capsys, caplog
):
    """SIGKILLed with complete checkpoints and no backbone/ (before: `a directory without
    backbone/`, rc 2, for the run and for its checkpoint folders; the way round through the
    model.safetensors inferred vit_base_patch8_224 for this tiny model): knn and export take the
    run (its newest complete checkpoint, logged) and a checkpoint folder, with the features of
    the backbone the run exports at that step; the checkpoint stays resumable (knn.json goes to
    the run directory)."""
    caplog.set_level(logging.WARNING, logger="ssl_vit")  # whatever level earlier tests left
    run = tmp_path / "killed"
    first = train_until_killed(tiny(run, method, epochs=10, save_every_steps=4, keep_last=100), 8)
    first = first.with_name("step_0000004")
    newest = latest_checkpoint(run)
    assert not (run / "backbone").exists() and newest.name >= "step_0000008"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for checkpoint, folder in ((run, newest), (first, first)):
        reference = exported_at(folder)
        export_backbone(reference, tmp_path / "reference" / folder.name)
        want = knn(capsys, str(tmp_path / "reference" / folder.name))
        assert metrics(knn(capsys, str(checkpoint))) == metrics(want)
        with torch.no_grad():
            assert torch.equal(load_pretrained(checkpoint).eval()(x).tokens, reference(x).tokens)
            out = tmp_path / "exported" / folder.name
            assert (
                ssl_vit(["export", "--checkpoint", str(checkpoint), "--output.dir", str(out)]) == 0
            )
            assert json.loads(capsys.readouterr().out)["name"] == "vit_tiny_patch16_224"
            model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
            torch.testing.assert_close(model.forward_features(x), reference(x).tokens, **FORWARD)
        check_checkpoint(folder)  # nothing added to it: a resume still takes it
        assert json.loads((run / "knn.json").read_text())["checkpoint"] == str(checkpoint)
    assert f"{run} has no backbone/ yet (interrupted, or still training): using its newest " in (
        caplog.text
    )


def test_accuracies_are_the_counts_percentages_to_three_decimals(tmp_path, capsys):
    """10 queries: every accuracy is a multiple of 10 % exactly (before: a float32 mean printed
    30.000001907348633)."""
    backbone = Backbone(NAME, **KW)
    backbone.load_state_dict(vit(4, **KW).state_dict())
    export_backbone(backbone, tmp_path / "run")
    result = knn(capsys, str(tmp_path / "run"))
    accuracies = {k: v for k, v in result.items() if k.startswith("knn_top")}
    assert len(accuracies) == 4
    assert all(v in [10.0 * i for i in range(11)] for v in accuracies.values()), accuracies
    assert any(v not in (0.0, 50.0, 100.0) for v in accuracies.values())  # not float32-exact
