"""`ssl-vit bench`: one tiny end-to-end run (two spawned phase processes), --help, bad options."""

import json
import math

import pytest
import torch

from ssl_vit.bench import main

TINY = [
    "--method", "mae",
    "--model.name", "vit_tiny_patch16_224", "--model.img_size", "32", "--model.patch_size", "4",
    "--model.embed_dim", "48", "--model.depth", "2", "--model.num_heads", "3",
    "--method.decoder_dim", "32", "--method.decoder_depth", "1", "--method.decoder_heads", "2",
    "--bench.batch_size", "4", "--bench.steps", "2", "--bench.warmup", "1", "--bench.device", "cpu",
]  # fmt: skip


def test_bench_reports_consistent_metrics_for_method_and_full_token_step(capsys, tmp_path):
    out_file = tmp_path / "sub" / "bench.json"
    assert main([*TINY, "--bench.output", str(out_file)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, "stdout holds exactly one JSON line"
    m = json.loads(lines[0])
    assert json.loads(out_file.read_text()) == m

    assert m["method"] == "mae" and m["model"] == "vit_tiny_patch16_224"
    assert m["model_kwargs"] == {
        "img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3,
    }  # fmt: skip
    assert m["method_config"]["decoder_dim"] == 32
    assert (m["batch_size"], m["steps"], m["warmup"]) == (4, 2, 1)
    assert (m["device"], m["precision"]) == ("cpu", "fp32")  # auto precision on CPU
    for prefix in ("", "full_token_"):
        t, mean = m[prefix + "step_time_s"], m[prefix + "step_time_mean_s"]
        assert 0 < t < 60 and 0 < mean < 60 and math.isfinite(t)
        assert m[prefix + "img_per_s"] == pytest.approx(4 / t)
        assert m[prefix + "ms_per_img"] == pytest.approx(1e3 * t / 4)
        # Peak RSS of a process that imported torch and built a model: well above 50 MiB.
        assert 50 < m[prefix + "peak_mem_mib"] < 1e5
    assert m["ratio"] == pytest.approx(m["step_time_s"] / m["full_token_step_time_s"])
    # The losses prove each step ran its model: MAE's norm-pix MSE on noise is near 1 + var(pred);
    # the 1000-class head's cross-entropy at init is near ln(1000) = 6.9 (2.3 for 10 classes).
    assert 0.1 < m["loss"] < 10
    assert 4 < m["full_token_loss"] < 10
    assert "ratio mae / full-token step time" in captured.err


def test_bench_help_lists_every_section(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in ("--bench.batch_size", "--bench.baseline", "--model.name", "--method.mask_ratio"):
        assert key in out


def test_bench_rejects_unknown_and_invalid_options_by_name(capsys):
    assert main(["--bench.stepz", "3", "--bench.batch_size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--bench.stepz: unknown option; did you mean --bench.steps" in err
    assert main(["--bench.batch_size", "0", "--model.img_size", "30"]) == 2
    err = capsys.readouterr().err
    assert "bench.batch_size: must be >= 1" in err
    assert "model.img_size: 30 is not divisible by the patch size 16" in err
    assert main(["--method", "nope"]) == 2
    assert "--method: unknown method 'nope'" in capsys.readouterr().err


def test_summary_of_method_only_run_has_no_baseline_metrics():
    from ssl_vit.bench import BenchConfig, BenchRoot, PhaseResult, summarize, table
    from ssl_vit.methods.mae import MAEConfig

    root = BenchRoot(bench=BenchConfig(batch_size=8, baseline=False), method=MAEConfig())
    result = PhaseResult([0.4, 0.1, 0.2], 1.5, 900.0, "cpu", 2)
    m = summarize(root, "cpu", "fp32", {"method": result})
    assert m["step_time_s"] == 0.2 and m["step_time_mean_s"] == pytest.approx(0.7 / 3)
    assert m["img_per_s"] == pytest.approx(40.0) and m["ms_per_img"] == pytest.approx(25.0)
    assert m["full_token_step_time_s"] is None and m["ratio"] is None
    assert "full_token" not in table(m) and "ratio" not in table(m)


DINO_TINY = [
    "--method", "dino",
    "--model.name", "vit_tiny_patch16_224", "--model.img_size", "32", "--model.patch_size", "8",
    "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2",
    "--method.out_dim", "64", "--method.hidden_dim", "32", "--method.bottleneck_dim", "16",
    "--method.local_crops", "10", "--method.local_crop_size", "16",
    "--bench.batch_size", "2", "--bench.steps", "2", "--bench.warmup", "1", "--bench.device", "cpu",
]  # fmt: skip


def test_bench_batch_follows_the_method_view():
    from ssl_vit.bench import configure, synthetic_batch

    batch = synthetic_batch(configure(DINO_TINY), torch.device("cpu"), 3)
    shapes = [tuple(c.shape) for c in batch["crops"]]
    assert shapes == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 10
    assert batch["images"].shape == (2, 3, 32, 32) and batch["labels"].shape == (2,)
    mae = synthetic_batch(configure(TINY), torch.device("cpu"), 3)
    assert mae.keys() == {"images", "labels"} and mae["images"].shape == (4, 3, 32, 32)


def test_bench_runs_dino_with_multi_crop_batches(capsys):
    assert main([*DINO_TINY, "--bench.baseline", "false"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["method"] == "dino" and m["method_config"]["local_crops"] == 10
    # cross-entropy against a sharpened teacher over 64 outputs: about ln(64) = 4.2 at init
    assert 1 < m["loss"] < 10 and m["full_token_step_time_s"] is None
