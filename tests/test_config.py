"""Config tree, overrides, --help and validation."""

import subprocess
import sys
from pathlib import Path

import pytest

from ssl_vit.config import (
    Config,
    ConfigError,
    DataConfig,
    apply_overrides,
    help_text,
    options,
    parse_args,
    validate,
)
from ssl_vit.methods.mae import MAEConfig
from ssl_vit.registry import method_configs

ROOT = Path(__file__).resolve().parents[1]


def mae_config() -> Config:
    return Config(method=MAEConfig())


def test_overrides_convert_each_type():
    cfg = mae_config()
    overrides, want_help = parse_args(
        [
            "--train.epochs",
            "3.5",
            "--train.batch_size=16",
            "--data.crop_scale",
            "0.3,0.9",
            "--train.overwrite",
            "true",
            "--data.interpolation",
            "bilinear",
            "--method.mask_ratio",
            "0.6",
            "--model.name",
            "vit_small_patch16_224",
        ]
    )
    assert not want_help
    apply_overrides(cfg, overrides)
    assert cfg.train.epochs == 3.5 and cfg.train.batch_size == 16
    assert cfg.data.crop_scale == (0.3, 0.9)
    assert cfg.train.overwrite is True
    assert cfg.data.interpolation == "bilinear"
    assert cfg.method.mask_ratio == 0.6
    assert cfg.model.name == "vit_small_patch16_224"


def test_unknown_and_ill_typed_keys_are_reported_together_with_close_matches():
    with pytest.raises(ConfigError) as err:
        apply_overrides(
            mae_config(),
            {
                "train.epoch": "3",
                "method.mask_ration": "0.5",
                "train.batch_size": "ten",
                "data.interpolation": "lanczos",
                "train.overwrite": "maybe",
                "nosection": "1",
            },
        )
    msg = str(err.value)
    assert len(err.value.errors) == 6
    assert "--train.epoch: unknown option; did you mean --train.epochs" in msg
    assert "--method.mask_ration: unknown option; did you mean --method.mask_ratio" in msg
    assert "--train.batch_size: expected int, got 'ten'" in msg
    assert "--data.interpolation: expected one of ['bicubic', 'bilinear', 'nearest']" in msg
    assert "--train.overwrite: expected a boolean" in msg
    assert "--nosection: unknown option" in msg


def test_int_field_rejects_fraction_and_tuple_rejects_wrong_length():
    with pytest.raises(ConfigError) as err:
        apply_overrides(mae_config(), {"train.batch_size": "2.5", "data.crop_scale": "0.1"})
    assert "--train.batch_size: expected int, got '2.5'" in str(err.value)
    assert "--data.crop_scale: expected 2 comma-separated values" in str(err.value)


def test_flag_without_value_and_positional_are_errors():
    with pytest.raises(ConfigError) as err:
        parse_args(["stray", "--train.epochs"])
    assert [e.split(":")[0] for e in err.value.errors] == ["'stray'", "--train.epochs"]


def test_help_lists_every_field_with_doc_and_default():
    cfg = mae_config()
    text = help_text(cfg, "mae_vitb.py")
    opts = options(cfg)
    assert len(opts) == sum(1 for line in text.splitlines() if line.startswith("  --"))
    for opt in opts:
        assert opt.doc, f"{opt.key} has no doc"
        assert f"--{opt.key} " in text
    assert "--method.mask_ratio float  (default: 0.75)" in text
    assert "--data.crop_scale tuple[float,float]  (default: 0.2,1.0)" in text
    assert "Fraction of patches removed" in text


def test_validation_reports_every_bad_value_at_once(tmp_path):
    cfg = mae_config()
    cfg.model.img_size = 100  # not a multiple of 16
    cfg.method.mask_ratio = 1.5
    cfg.train.batch_size = 0
    cfg.data.path = str(tmp_path / "missing")
    cfg.train.warmup_epochs = 200
    cfg.train.epochs = 10
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    keys = sorted(e.split(":")[0] for e in err.value.errors)
    assert keys == [
        "data.path",
        "method.mask_ratio",
        "model.img_size",
        "train.batch_size",
        "train.warmup_epochs",
    ]
    assert "100 is not divisible by the patch size 16" in str(err.value)
    assert "missing' does not exist" in str(err.value)


def test_patch_size_override_changes_divisibility():
    cfg = mae_config()
    cfg.model.img_size, cfg.model.patch_size = 36, 4
    validate(cfg)
    cfg.model.patch_size = 8
    with pytest.raises(
        ConfigError, match="model.img_size: 36 is not divisible by the patch size 8"
    ):
        validate(cfg)


def test_round_trip_through_dict():
    cfg = mae_config()
    apply_overrides(
        cfg, {"method.mask_ratio": "0.5", "data.crop_scale": "0.1,0.5", "train.epochs": "7"}
    )
    again = Config.from_dict(cfg.to_dict(), method_configs())
    assert again == cfg and isinstance(again.method, MAEConfig)
    assert again.data == DataConfig(crop_scale=(0.1, 0.5))


def test_recipe_help_and_typo_from_the_command_line():
    recipe = str(ROOT / "recipes" / "mae_vitb.py")
    ok = subprocess.run([sys.executable, recipe, "--help"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    n = sum(1 for line in ok.stdout.splitlines() if line.startswith("  --"))
    assert n == len(options(mae_config())) + 2  # and --config FILE, --print-config
    assert "--train.effective_batch int  (default: 4096)" in ok.stdout  # the recipe's value
    bad = subprocess.run(
        [sys.executable, recipe, "--train.epoch", "1"], capture_output=True, text=True
    )
    assert bad.returncode != 0
    assert "--train.epoch: unknown option; did you mean --train.epochs" in bad.stderr


def test_type_names_in_help():
    from ssl_vit.config import type_name

    assert type_name(tuple[int, ...]) == "tuple[int,...]"
    assert type_name(float | None) == "float | none"
