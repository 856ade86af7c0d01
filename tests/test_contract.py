"""The Method contract, held by everything in the registry (timm's test_models.py style): each
pretext method and evaluator satisfies the `Method` protocol, gives a finite scalar loss on a
batch of its own view, trains one step through `fit`, round-trips its state dict, exports a
backbone (and a classifier, where it classifies) that timm loads strictly, and imports without
Accelerate."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_MODEL, tiny
from safetensors.torch import load_file, save_file

from ssl_vit.backbone import Backbone
from ssl_vit.data import collate
from ssl_vit.methods.protocol import Method
from ssl_vit.registry import EVALUATORS, METHODS, TRAINABLE
from ssl_vit.train.loop import fit
from ssl_vit.weights import CheckpointError, export_backbone, load_pretrained

NAMES = list(TRAINABLE)


def built(name: str, tmp_path, seed: int = 0):
    """(the run config, the module built as the loop builds it) on a fresh tiny backbone, whose
    weights are also exported to tmp_path/pretrained for the evaluators' checkpoint."""
    cfg = tiny(tmp_path / "run", name)
    torch.manual_seed(seed)
    backbone = Backbone(**TINY_MODEL)
    if name in EVALUATORS:
        tmp_path.mkdir(parents=True, exist_ok=True)
        export_backbone(backbone, tmp_path)
        cfg.method.checkpoint = str(tmp_path)
    return cfg, TRAINABLE[name].build(backbone, cfg.method)


def batch_of(cfg, name: str, n: int = 4) -> dict:
    """n synthetic images through the method's own view, collated as the loader does."""
    spec = TRAINABLE[name]
    data = spec.dataset(cfg.data, spec.view(cfg), seed=0, image_size=32)
    return collate([data[i] for i in range(n)])


def test_the_tables():
    assert list(METHODS) == ["mae", "dino", "dinov2", "dinov3", "deit"]
    assert list(EVALUATORS) == ["linprobe", "finetune", "segprobe", "segfinetune"]
    for name, spec in TRAINABLE.items():
        assert spec.config.name == name  # the key is the config's name (config.json's method)


@pytest.mark.parametrize("name", NAMES)
def test_training_step_gives_a_finite_scalar_loss_and_scalars(name, tmp_path):
    cfg, method = built(name, tmp_path)
    assert isinstance(method, Method)
    method.set_schedule(16, 4)
    out = method.training_step(batch_of(cfg, name))
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    assert math.isfinite(out["loss"].item())
    assert all(v.ndim == 0 and not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    trained = [p for p in method.parameters() if p.requires_grad]
    assert trained and all(
        p.grad is not None for g in method.param_groups(0.05) for p in g["params"]
    )


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name, tmp_path):
    _, a = built(name, tmp_path, seed=0)
    _, b = built(name, tmp_path / "b", seed=1)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p))
    state = a.state_dict()
    assert any(not torch.equal(state[k], v) for k, v in b.state_dict().items())
    b.load_state_dict(state, strict=True)
    assert all(torch.equal(state[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize("name", NAMES)
def test_exports_load_strictly_into_timm(name, tmp_path):
    _, method = built(name, tmp_path)
    backbone = method.export_backbone()
    spec = backbone.config_dict()
    model = timm.create_model(spec["name"], pretrained=False, num_classes=0, **spec["kwargs"])
    model.load_state_dict(backbone.state_dict(), strict=True)
    exported = method.export_classifier()
    assert exported is None or method.classifies  # only a classifier exports one
    if exported is not None:
        state, timm_name, kwargs = exported
        timm.create_model(timm_name, pretrained=False, **kwargs).load_state_dict(state, strict=True)


@pytest.mark.parametrize("name", NAMES)
def test_one_step_through_fit(name, tmp_path):
    cfg, method = built(name, tmp_path)
    cfg.train.max_steps = 1
    result = fit(cfg)
    assert result["steps"] == 1 and math.isfinite(result["first_loss"])
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["method"]["name"] == name
    exported = load_file(str(run / "backbone" / "model.safetensors"))
    assert exported.keys() == method.export_backbone().state_dict().keys()
    assert (run / "classifier" / "model.safetensors").is_file() == (
        method.export_classifier() is not None
    )


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_folder_gives_the_backbone_the_run_exports(name, tmp_path, caplog):
    """A run's checkpoint folder, and the run directory before its backbone/ export (interrupted:
    its newest complete checkpoint, logged), load exactly the network the run exports
    (`export_backbone`: DINO's teacher, not its student), built from the folder's config.json
    (width 32 is no standard size: nothing could infer its heads); fine-tuning's is refused."""
    cfg, method = built(name, tmp_path)
    run = Path(cfg.train.output_dir)

    def checkpoint(step: int, complete: bool = True) -> tuple[Path, dict]:
        with torch.no_grad():  # every tensor its own values: teacher and student apart
            for p in method.parameters():
                p.copy_(torch.randn_like(p))
        folder = run / "checkpoints" / f"step_{step:07d}"
        folder.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in method.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(cfg.to_json())
        if complete:
            (folder / "complete").write_text("{}")
        return folder, {k: v.clone() for k, v in method.export_backbone().state_dict().items()}

    (first, want_first), (_, want_newest) = checkpoint(4), checkpoint(8)
    cut_short, _ = checkpoint(12, complete=False)  # a save cut short: never taken
    if name == "finetune":  # its classifier reshaped the backbone (global_pool): not rebuilt
        with pytest.raises(CheckpointError, match=f"the backbone of a {name} run is not taken"):
            load_pretrained(first)
        return
    weights = first / "model.safetensors"  # before: its architecture inferred from the shapes
    for source, want in ((first, want_first), (weights, want_first), (run, want_newest)):
        loaded = load_pretrained(source)
        assert loaded.config_dict() == {"name": cfg.model.name, "kwargs": cfg.model.timm_kwargs()}
        got = loaded.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert f"using its newest complete checkpoint, {run / 'checkpoints' / 'step_0000008'}" in (
        caplog.text
    )
    with pytest.raises(CheckpointError, match="an incomplete checkpoint"):
        load_pretrained(cut_short)
    if name in ("dino", "dinov2", "dinov3"):  # the student, asked for by name
        student = load_pretrained(first, which="student").state_dict()
        assert not torch.equal(student["pos_embed"], want_first["pos_embed"])
        assert all(torch.equal(student[k], v) for k, v in checkpoint_student(first).items())


def checkpoint_student(folder: Path) -> dict[str, torch.Tensor]:
    """DINO's student backbone as its checkpoint holds it: the method's own `backbone.*`."""
    state = load_file(str(folder / "model.safetensors"))
    return {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}


@pytest.mark.parametrize("name", NAMES)
def test_importing_it_does_not_load_accelerate(name):
    module = TRAINABLE[name].build.__module__
    code = f"import sys, {module}; print('accelerate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", module
