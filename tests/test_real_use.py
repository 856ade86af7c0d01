"""Real use from the command line: DeiT's classes come from the data and its model EMA is
evaluated and exported beside the raw weights; `--config FILE` (JSON or YAML) under command-line
overrides and `--print-config`; `--train.log_with`; evaluation commands list no training-only
fields; `visualize mae --image`; `ssl-vit embed` and `visualize pca` on every checkpoint format."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch
from conftest import overrides, tiny
from PIL import Image
from safetensors import safe_open
from test_evaluation_data import image_folder
from torchvision.transforms.functional import to_pil_image

from ssl_vit.backbone import Backbone
from ssl_vit.cli import main
from ssl_vit.data import SyntheticImages
from ssl_vit.train.loop import fit
from ssl_vit.viz.pca import pca_rgb
from ssl_vit.weights import export_backbone, load_pretrained


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_deit_counts_the_classes_and_evaluates_and_exports_its_ema(tmp_path):
    """A 4-class folder (before: a 1000-way head, top-5 of 5 % and no EMA anywhere)."""
    data = tmp_path / "data"
    image_folder(data / "train", "train", 16)
    image_folder(data / "val", "val", 8)
    cfg = tiny(tmp_path / "run", "deit", epochs=2, eval_every_epochs=1)
    cfg.method.num_classes, cfg.data.path = 0, str(data)
    result = fit(cfg)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["method"]["num_classes"] == 4
    assert {"val_top1", "val_ema_top1", "val_ema_top5"} <= result.keys()
    run = tmp_path / "run"
    raw = timm.create_model(f"local-dir:{run / 'classifier'}", pretrained=True).eval()
    ema = timm.create_model(f"local-dir:{run / 'classifier_ema'}", pretrained=True).eval()
    assert raw.num_classes == ema.num_classes == 4
    assert not torch.equal(raw.head.weight, ema.head.weight)  # decay 0.99996: near the init
    ema_backbone = load_pretrained(run / "backbone_ema")
    assert torch.equal(ema_backbone.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight)


def test_config_file_json_and_yaml_under_command_line_overrides(tmp_path, capsys):
    cfg = tiny(tmp_path / "a", "dino", epochs=3)
    cfg.method.out_dim = 48
    (tmp_path / "run.json").write_text(cfg.to_json())
    code, out, _ = run_cli(
        capsys, "train", "--config", str(tmp_path / "run.json"), "--train.epochs", "5",
        "--print-config",
    )  # fmt: skip
    printed = json.loads(out)
    assert code == 0 and printed["method"]["name"] == "dino"  # --method from the file
    assert printed["method"]["out_dim"] == 48 and printed["train"]["epochs"] == 5  # flag wins
    (tmp_path / "printed.json").write_text(out)
    code, again, _ = run_cli(
        capsys, "train", "--config", str(tmp_path / "printed.json"), "--print-config"
    )
    assert json.loads(again) == printed  # --print-config's output is a config file

    (tmp_path / "run.yaml").write_text(
        "method:\n  name: mae\n  mask_ratio: 0.6\ntrain:\n  epochs: 2\n"
    )
    code, out, _ = run_cli(
        capsys, "train", "--config", str(tmp_path / "run.yaml"), "--print-config"
    )
    assert code == 0 and json.loads(out)["method"]["mask_ratio"] == 0.6

    (tmp_path / "bad.yaml").write_text("train:\n  epoch: 2\n")
    code, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "bad.yaml"))
    assert code == 2 and f"--config {tmp_path / 'bad.yaml'}: train.epoch: unknown option" in err
    code, _, err = run_cli(
        capsys, "train", "--method", "mae", "--config", str(tmp_path / "run.json")
    )
    assert code == 2 and "is a dino config, not mae" in err
    code, _, err = run_cli(capsys, "knn", "--config", str(tmp_path / "nope.json"))
    assert code == 2 and "nope.json: no such file" in err


def test_log_with_picks_the_trackers(tmp_path, capsys):
    cfg = tiny(tmp_path / "none", max_steps=1)
    code, _, _ = run_cli(capsys, "train", *overrides(cfg), "--train.log_with", "none")
    assert code == 0 and not (tmp_path / "none" / "tb").exists()
    code, _, err = run_cli(capsys, "train", *overrides(cfg), "--train.log_with", "tensorbord")
    assert code == 2 and "train.log_with: unknown tracker 'tensorbord'" in err


def test_evaluation_commands_list_no_training_only_fields(capsys):
    for command in (["knn"], ["embed"], ["visualize", "pca"], ["visualize", "attention"]):
        code, out, _ = run_cli(capsys, *command, "--help")
        assert code == 0 and "--data.val_split" in out
        assert not any(f in out for f in ("crop_scale", "hflip", "decode_on_device")), command


def test_every_help_names_config_print_config_and_what_checkpoint_takes(capsys):
    """Before: --config and --print-config were in no --help; knn's and export's --checkpoint
    help said "a run directory or its backbone.safetensors" (the layout of earlier versions)."""
    commands = [["train"], ["train", "--method", "deit"], ["knn"], ["embed"], ["linprobe"]]
    commands += [["finetune"], ["export"], ["import"], ["visualize", "pca"]]
    for command in commands:
        code, out, _ = run_cli(capsys, *command, "--help")
        assert code == 0 and "\n  --config FILE  start from FILE (JSON or YAML" in out, command
        assert "\n  --print-config  print the resolved config as JSON" in out, command
        assert "backbone.safetensors" not in out, command
    for command in ("knn", "export", "linprobe"):
        _, out, _ = run_cli(capsys, command, "--help")
        assert "--checkpoint: a run directory (its backbone/ export) or a timm pretrained" in out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of 3 photo-like 48 px images, and one unreadable file."""
    root = tmp_path_factory.mktemp("photos")
    images = SyntheticImages(3, 10, 48, "val")
    for i in range(3):
        to_pil_image(images[i][0]).save(root / f"p{i}.jpg")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mae") / "run"
    fit(tiny(run, epochs=1))
    return run


def test_embed_every_checkpoint_format_same_features_with_ids(
    tmp_path, photos, mae_run, capsys, caplog
):
    caplog.set_level(logging.WARNING, logger="ssl_vit")  # whatever level earlier tests left
    official = tmp_path / "mae_pretrain.pth"  # the official MAE layout of the same encoder
    torch.save({"model": load_pretrained(mae_run).state_dict()}, official)
    forms = [str(mae_run), str(mae_run / "backbone"), str(official)]
    outputs = []
    for i, checkpoint in enumerate(forms):
        out = tmp_path / f"e{i}.safetensors"
        code, stdout, err = run_cli(
            capsys, "embed", "--checkpoint", checkpoint, "--data.path", str(photos),
            "--embed.output", str(out), "--data.num_workers", "0",
            *(["--load.num_heads", "2"] if checkpoint.endswith(".pth") else []),
        )  # fmt: skip
        assert code == 0, err
        result = json.loads(stdout)
        assert (result["images"], result["dim"], result["skipped_images"]) == (3, 32, 1)
        assert result["skipped_paths"] == [str(photos / "broken.jpg")]  # before: a count alone
        assert f"skipped unreadable image {photos / 'broken.jpg'} (left out of {out})" in [
            r.getMessage() for r in caplog.records
        ]
        with safe_open(str(out), "pt") as f:
            ids = json.loads(f.metadata()["ids"])
            outputs.append(f.get_tensor("embeddings"))
        assert [p.rsplit("/", 1)[1] for p in ids] == ["p0.jpg", "p1.jpg", "p2.jpg"]  # no broken
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
    pq = pytest.importorskip("pyarrow.parquet")
    code, _, _ = run_cli(
        capsys, "embed", "--checkpoint", str(mae_run), "--data.path", str(photos),
        "--embed.output", str(tmp_path / "e.parquet"), "--embed.pool", "avgpool",
        "--data.num_workers", "0",
    )  # fmt: skip
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column_names == ["id", "label", "embedding"] and table.num_rows == 3
    assert table.column("label").to_pylist() == [-1, -1, -1]  # a flat folder: unlabeled


def test_pca_colours_foreground_and_blacks_out_the_background():
    """Hand case: 2 images of a 4 x 4 grid; border patches share a background feature, the 4
    centre patches carry distinct foreground features. The background goes black, and the
    foreground's 3 components spread over the colour range."""
    g = torch.Generator().manual_seed(0)
    bg = torch.randn(16, generator=g)
    feats = bg.repeat(2, 16, 1) + 0.01 * torch.randn(2, 16, 16, generator=g)
    centre = [5, 6, 9, 10]
    feats[:, centre] = 5 * torch.randn(2, 4, 16, generator=g) + 3
    rgb, fg, explained = pca_rgb(feats, (4, 4))
    assert fg.flatten(1)[:, centre].all() and fg.sum() == 8
    assert rgb.flatten(2)[..., [i for i in range(16) if i not in centre]].abs().max() == 0
    assert rgb.amax() == 1 and explained.sum() <= 1
    rgb_all, fg_all, _ = pca_rgb(feats, (4, 4), remove_background=False)
    assert fg_all.all()


def test_pca_foreground_touching_the_border_stays_foreground():
    """An object on the bottom edge (a roof against the sky): 6 of the 20 border patches. Its
    first-component values outweigh the background's, so the border's mean would pick the wrong
    sign; the border's majority picks the right one."""
    g = torch.Generator().manual_seed(0)
    background = torch.randn(16, generator=g).repeat(1, 36, 1)
    feats = background + 0.01 * torch.randn(1, 36, 16, generator=g)
    obj = torch.zeros(6, 6, dtype=torch.bool)
    obj[5, :], obj[2:4, 2:4] = True, True
    feats[0, obj.flatten()] = 3 + 0.5 * torch.randn(10, 16, generator=g)
    _, fg, _ = pca_rgb(feats, (6, 6))
    assert torch.equal(fg[0], obj)


def test_pca_and_mae_pictures_of_image_files(tmp_path, photos, mae_run, capsys):
    files = ",".join(str(photos / f"p{i}.jpg") for i in range(2))
    for command, extra in (("pca", ["--img_size", "48"]), ("mae", [])):
        out = tmp_path / f"{command}.png"
        code, stdout, err = run_cli(
            capsys, "visualize", command, "--checkpoint", str(mae_run), "--image", files,
            "--output", str(out), *extra,
        )  # fmt: skip
        assert code == 0, err
        with Image.open(out) as im:
            assert im.format == "PNG" and im.size[0] >= 2 * 160
        assert json.loads(stdout)["images"] == files.split(",")
    code, stdout, _ = run_cli(
        capsys, "visualize", "pca", "--checkpoint", str(mae_run / "backbone"), "--data.path",
        str(photos), "--num_images", "3", "--output", str(tmp_path / "dir.png"),
    )  # fmt: skip
    assert code == 0 and json.loads(stdout)["grid"] == [4, 4]


def test_exported_backbone_of_a_run_loads_in_timm_with_its_kwargs(tmp_path):
    backbone = Backbone(
        "vit_small_patch16_224", img_size=48, patch_size=12, depth=2, qkv_bias=False
    )
    export_backbone(backbone, tmp_path)
    model = timm.create_model(f"local-dir:{tmp_path / 'backbone'}", pretrained=True).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x).tokens, model.forward_features(x))
