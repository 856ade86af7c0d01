"""Fine-tuning: layer-decay groups against MAE's layer numbering, the avg-pool backbone with a fresh
fc_norm, head init, position-embedding resampling for a larger image size, the exported classifier
in timm (strict, equal logits), and a run at a higher resolution than pretraining."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ssl_vit.backbone import Backbone
from ssl_vit.cli.train import run as run_evaluator
from ssl_vit.config import Config, DataConfig, ModelConfig
from ssl_vit.eval.accuracy import eval_loader
from ssl_vit.eval.finetune import FineTune, FineTuneConfig, finetune_config
from ssl_vit.eval.pretrained import pretrained_backbone
from ssl_vit.methods.deit import DeiTConfig
from ssl_vit.weights import export_backbone

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
K = 10


def backbone(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return Backbone("vit_tiny_patch16_224", **TINY)


def finetune(pool: str = "avg", model_ema: bool = False, **kw) -> FineTune:
    deit = DeiTConfig(num_classes=K, mixup=0.0, cutmix=0.0, model_ema=model_ema)
    return FineTune(backbone(), FineTuneConfig(global_pool=pool, deit=deit, **kw))


def mae_layer_id(name: str, depth: int) -> int:
    """MAE's util/lr_decay.py get_layer_id_for_vit, on our parameter names."""
    name = name.removeprefix("backbone.")
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_layer_decay_groups_follow_mae_numbering(pool):
    model = finetune(pool, layer_decay=0.65, model_ema=True)
    depth = TINY["depth"]
    groups = model.param_groups(0.05)
    group_of = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.deit.student.named_parameters())
    assert len(group_of) == sum(len(g["params"]) for g in groups) == len(named)  # once each
    ema = {id(p) for p in model.deit.ema.parameters()}
    assert not ema & group_of.keys()  # the EMA is not optimised
    seen = set()
    for name, p in named.items():
        g, layer = group_of[id(p)], mae_layer_id(name, depth)
        assert g["lr_scale"] == pytest.approx(0.65 ** (depth + 1 - layer)), name
        exempt = p.ndim == 1 or name.endswith(("cls_token", "pos_embed"))
        assert g["wd_scale"] == (0.0 if exempt else 1.0), name
        seen.add(layer)
    assert seen == set(range(depth + 2))  # embeddings, 3 blocks, head: 5 distinct lr scales
    assert group_of[id(named["head.weight"])]["lr_scale"] == 1.0
    assert group_of[id(named["backbone.patch_embed.proj.weight"])]["lr_scale"] == pytest.approx(
        0.65**4
    )
    final_norm = "backbone.fc_norm.weight" if pool == "avg" else "backbone.norm.weight"
    assert group_of[id(named[final_norm])]["lr_scale"] == 1.0  # MAE: with the head


def test_avg_pool_drops_the_final_norm_for_a_fresh_fc_norm_and_inits_the_head():
    pre = backbone()
    model = FineTune(backbone(), FineTuneConfig(deit=DeiTConfig(num_classes=1000)))
    bb = model.backbone
    assert isinstance(bb.norm, torch.nn.Identity) and bb.timm_kwargs["global_pool"] == "avg"
    assert torch.equal(bb.fc_norm.weight, torch.ones(32))
    assert torch.equal(bb.fc_norm.bias, torch.zeros(32))
    for k, v in pre.state_dict().items():
        if not k.startswith("norm."):
            assert torch.equal(bb.state_dict()[k], v), k
    w = model.deit.student.head.weight.detach()
    assert 1.96e-5 < w.std() < 2.04e-5 and w.mean().abs() < 1e-6  # 32k draws of std 2e-5
    assert torch.equal(model.deit.student.head.bias, torch.zeros(1000))
    # what the classifier computes: fc_norm(mean of the patch tokens), not the cls token
    x = torch.randn(2, 3, 32, 32)
    tokens = bb(x).tokens
    expected = model.deit.student.head(F.layer_norm(tokens[:, 1:].mean(1), (32,), eps=1e-6))
    torch.testing.assert_close(model.predict(x), expected)


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_exported_classifier_loads_strict_into_timm_with_equal_logits(pool):
    model = finetune(pool).eval()
    with torch.no_grad():  # make the head and fc_norm matter (their init is ~0 and 1/0)
        for p in model.deit.student.head.parameters():
            p.normal_()
        for p in model.backbone.fc_norm.parameters():
            p.normal_()
    state, name, kwargs = model.export_classifier()
    timm_model = timm.create_model(name, pretrained=False, **kwargs).eval()
    timm_model.load_state_dict(state, strict=True)
    assert timm_model.global_pool == pool and timm_model.num_classes == K
    if pool == "avg":
        assert isinstance(timm_model.norm, torch.nn.Identity)
        assert isinstance(timm_model.fc_norm, torch.nn.LayerNorm)
    x = torch.randn(4, 3, 32, 32)
    ours = model.predict(x)
    assert ours.std() > 0.1
    torch.testing.assert_close(timm_model(x), ours)


def test_larger_image_size_resamples_the_position_embedding(tmp_path):
    pre = backbone()
    export_backbone(pre, tmp_path)
    cfg = Config(
        model=ModelConfig(name="vit_tiny_patch16_224", img_size=48, patch_size=8),
        method=FineTuneConfig(checkpoint=str(tmp_path)),
    )
    bb = pretrained_backbone(cfg)
    assert bb.grid_size == (6, 6) and bb.pos_embed.shape == (1, 1 + 36, 32)
    # MAE's interpolate_pos_embed: the patch positions as their 4 x 4 grid, bicubic to 6 x 6
    # without antialiasing, cls unchanged (timm's loader antialiases: ~7% of the largest entry)
    grid = pre.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    expected = torch.cat([pre.pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 36, 32)], 1)
    torch.testing.assert_close(bb.pos_embed, expected)
    assert torch.equal(bb.blocks[0].attn.qkv.weight, pre.blocks[0].attn.qkv.weight)


def test_finetune_at_a_higher_resolution_runs_and_its_export_reproduces_the_accuracy(
    tmp_path, capsys
):
    pre = tmp_path / "pretrained"
    pre.mkdir()
    export_backbone(backbone(), pre)
    run = tmp_path / "finetune"
    code = run_evaluator(
        finetune_config(),
        [
            "--checkpoint", str(pre), "--model.img_size", "48", "--train.output_dir", str(run),
            "--train.epochs", "2", "--train.warmup_epochs", "1", "--train.batch_size", "16",
            "--train.base_lr", "1e-2", "--data.synthetic_size", "64", "--data.num_workers", "0",
            "--train.log_every", "2", "--train.save_every_epochs", "0",
        ],
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 8 and result["final_loss"] == pytest.approx(result["final_loss"])
    assert {"val_top1", "val_top5", "best_val_top1", "best_step"} <= result.keys()

    spec = json.loads((run / "classifier" / "config.json").read_text())["model_args"]
    assert spec["img_size"] in (48, [48, 48]) and spec["global_pool"] == "avg"  # by timm version
    assert spec["num_classes"] == K and spec["drop_path_rate"] == 0.1
    model = timm.create_model(f"local-dir:{run / 'classifier'}", pretrained=True).eval()
    # timm's forward of the exported weights gives the run's own final validation accuracy
    cfg = Config(
        model=ModelConfig(img_size=48),
        data=DataConfig(synthetic_size=64, num_workers=0),
        method=FineTuneConfig(),
    )
    with torch.no_grad():
        hits = [
            (model(b["images"]).argmax(-1) == b["labels"]).float()
            for b in eval_loader(cfg, "val", Accelerator(cpu=True))
        ]
    assert 100 * torch.cat(hits).mean().item() == pytest.approx(result["val_top1"])
    assert (run / "classifier_best" / "model.safetensors").is_file()
