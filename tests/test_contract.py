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

import pytest
import timm
import torch
from conftest import TINY_MODEL, tiny
from safetensors.torch import load_file

from ssl_vit.backbone import Backbone
from ssl_vit.data import build_dataset, collate
from ssl_vit.methods.protocol import Method
from ssl_vit.registry import EVALUATORS, METHODS, TRAINABLE
from ssl_vit.train.loop import fit
from ssl_vit.weights import export_backbone

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
    data = build_dataset(cfg.data, TRAINABLE[name].view(cfg), seed=0, image_size=32)
    return collate([data[i] for i in range(n)])


def test_the_tables():
    assert list(METHODS) == ["mae", "dino", "dinov2", "deit"]
    assert list(EVALUATORS) == ["linprobe", "finetune"]
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
def test_importing_it_does_not_load_accelerate(name):
    module = TRAINABLE[name].build.__module__
    code = f"import sys, {module}; print('accelerate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", module
