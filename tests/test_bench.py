"""`ssl-vit bench`: tiny end-to-end runs (spawned phase processes), --help, bad options; the
analytic FLOP count against FlopCounterMode and REFERENCE.md's anchors; MFU arithmetic; the
real-data phases (loader alone, e2e step) in this process."""

import json
import math

import pytest
import torch
from bench import main
from torch.utils.flop_counter import FlopCounterMode

from ssl_vit.eval.segfinetune import semantic_targets


def block_flops(t: int, d: int, h: int) -> int:
    """A pre-norm ViT block on t tokens of width d, MLP width h, by hand: qkv 6td^2, proj 2td^2,
    MLP 4tdh, attention q k^T and weights @ v 4t^2d (2 FLOPs per multiply-add)."""
    return 8 * t * d * d + 4 * t * d * h + 4 * t * t * d


TINY = [
    "--method", "mae",
    "--model.name", "vit_tiny_patch16_224", "--model.img_size", "32", "--model.patch_size", "4",
    "--model.embed_dim", "48", "--model.depth", "2", "--model.num_heads", "3",
    "--method.decoder_dim", "32", "--method.decoder_depth", "1", "--method.decoder_heads", "2",
    "--bench.batch_size", "4", "--bench.steps", "2", "--bench.warmup", "1", "--bench.device", "cpu",
]  # fmt: skip


def test_bench_reports_consistent_metrics_for_method_and_full_token_step(capsys, tmp_path):
    out_file = tmp_path / "sub" / "bench.json"
    args = ["--bench.modes", "compute,e2e", "--data.num_workers", "0", "--bench.peak_tflops", "2"]
    assert main([*TINY, *args, "--bench.output", str(out_file)]) == 0
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
    assert m["modes"] == ["compute", "e2e"] and m["loader_views"] == []
    # Analytic FLOPs, by hand: a block on T tokens of width D, MLP H costs 8TD^2 + 4TDH + 4T^2D;
    # the patch embedding 2 * 64 * 48 * 48. MAE: encoder on 1 + 16 kept of 64 patches (D 48, H 192,
    # 2 blocks), decoder embed 17 x 48 -> 32, 1 block on 65 tokens (D 32, H 128), pred 32 -> 48.
    embed = 2 * 64 * 48 * 48
    encoder = embed + 2 * block_flops(17, 48, 192)
    decoder = 2 * 17 * 48 * 32 + block_flops(65, 32, 128) + 2 * 65 * 32 * 48
    assert m["forward_flops_per_img"] == encoder + decoder == 4_676_096
    assert m["flops_per_img"] == 3 * m["forward_flops_per_img"]
    full = embed + 2 * block_flops(65, 48, 192) + 2 * 48 * 1000  # all tokens, 1000-class head
    assert m["full_token_flops_per_img"] == 3 * full
    assert (m["peak_tflops"], m["peak_source"]) == (2.0, "--bench.peak_tflops")
    for prefix in ("", "e2e_", "full_token_"):
        t, mean = m[prefix + "step_time_s"], m[prefix + "step_time_mean_s"]
        assert 0 < t < 60 and 0 < mean < 60 and math.isfinite(t)
        assert m[prefix + "img_per_s"] == pytest.approx(4 / t)
        assert m[prefix + "ms_per_img"] == pytest.approx(1e3 * t / 4)
        flops = m["full_token_flops_per_img" if prefix == "full_token_" else "flops_per_img"]
        assert m[prefix + "tflops"] == pytest.approx(flops * 4 / t / 1e12)
        assert m[prefix + "mfu"] == pytest.approx(m[prefix + "tflops"] / 2)
        # Peak RSS of a process that imported torch and built a model: well above 50 MiB.
        assert 50 < m[prefix + "peak_mem_mib"] < 1e5
    assert m["ratio"] == pytest.approx(m["step_time_s"] / m["full_token_step_time_s"])
    assert m["e2e_over_compute"] == pytest.approx(m["e2e_step_time_s"] / m["step_time_s"])
    # The losses prove each step ran its model: MAE's norm-pix MSE on noise is near 1 + var(pred);
    # the 1000-class head's cross-entropy at init is near ln(1000) = 6.9 (2.3 for 10 classes).
    # e2e regresses real (synthetic-dataset) images, so its loss is of the same kind.
    assert 0.1 < m["loss"] < 10 and 0.1 < m["e2e_loss"] < 10
    assert 4 < m["full_token_loss"] < 10
    assert "ratio mae / full-token step time" in captured.err
    assert "loader/0w" in captured.err and "e2e / compute step time" in captured.err


def test_bench_help_lists_every_section(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    keys = ("--bench.batch_size", "--bench.baseline", "--bench.modes", "--bench.loader_views",
            "--bench.peak_tflops", "--data.num_workers", "--data.path", "--train.compile",
            "--train.compile_backend", "--train.clip_grad", "--train.clip_mode",
            "--model.name", "--method.mask_ratio")  # fmt: skip
    for key in keys:
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


def test_the_train_settings_of_the_timed_step_reach_the_trainer_config():
    """--train.clip_grad / clip_mode / compile_backend are the trainer's fields of the same names
    (DINO's recipes clip each parameter's gradient at 3, as the official step the GPU suite
    compares with); the metrics name them."""
    from bench import BenchConfig, BenchRoot, PhaseResult, configure, run_config, summarize

    from ssl_vit.methods.mae import MAEConfig

    flags = ["--train.clip_grad", "3", "--train.clip_mode", "param", "--train.compile", "true"]
    root = configure([*TINY, *flags, "--train.compile_backend", "eager"])
    t = run_config(root).train
    assert (t.clip_grad, t.clip_mode, t.compile, t.compile_backend) == (3.0, "param", True, "eager")
    assert (t.batch_size, run_config(configure(TINY)).train.clip_grad) == (4, 0.0)
    result = PhaseResult([0.1], 1.0, 1.0, "cpu", 1)
    m = summarize(root, "cpu", "fp32", {"method": result})
    assert (m["clip_grad"], m["clip_mode"], m["compile_backend"]) == (3.0, "param", "eager")
    m = summarize(BenchRoot(BenchConfig(), method=MAEConfig()), "cpu", "fp32", {"method": result})
    assert m["compile_backend"] is None  # not compiled


def test_time_steps_runs_the_warmup_untimed_then_times_each_step():
    """The one timing loop of bench.py and the GPU suite (ours and the official steps alike):
    steps 0..warmup-1 untimed, then `steps` steps each timed to its end; the last step's value."""
    import time

    from bench import time_steps

    calls = []

    def step(i: int) -> torch.Tensor:
        calls.append(i)
        time.sleep(0.02 if i >= 2 else 0.2)  # a slow warmup must not count
        return torch.tensor(float(i))

    times, last = time_steps(step, 2, 3, torch.device("cpu"))
    assert calls == [0, 1, 2, 3, 4] and last.item() == 4.0
    assert len(times) == 3 and all(0.02 <= t < 0.15 for t in times)


def test_summary_of_method_only_run_has_no_baseline_metrics():
    from bench import BenchConfig, BenchRoot, PhaseResult, summarize, table

    from ssl_vit.methods.mae import MAEConfig

    root = BenchRoot(bench=BenchConfig(batch_size=8, baseline=False), method=MAEConfig())
    result = PhaseResult([0.4, 0.1, 0.2], 1.5, 900.0, "cpu", 2)
    m = summarize(root, "cpu", "fp32", {"method": result})
    assert m["step_time_s"] == 0.2 and m["step_time_mean_s"] == pytest.approx(0.7 / 3)
    assert m["img_per_s"] == pytest.approx(40.0) and m["ms_per_img"] == pytest.approx(25.0)
    assert m["full_token_step_time_s"] is None and m["ratio"] is None
    assert m["tflops"] is None and m["mfu"] is None  # no FLOP count given
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
    from bench import configure, synthetic_batch

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


def test_bench_runs_dinov2_and_counts_its_flops(capsys):
    from bench import PHASES, configure

    assert main([*DINOV2_TINY, "--bench.baseline", "false"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["method"] == "dinov2" and math.isfinite(m["loss"])
    root = configure(DINOV2_TINY)
    count = PHASES["method"].count(root, PHASES["method"].build(root))
    assert m["flops_per_img"] == pytest.approx(count.train) and count.train > 0


# ---------------------------------------------------------------------------------------------
# FLOPs: the analytic count against FlopCounterMode, the reference anchors, MFU arithmetic.

DEIT_TINY = [
    "--method", "deit",
    "--model.name", "vit_tiny_patch16_224", "--model.img_size", "32", "--model.patch_size", "8",
    "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2",
    "--method.num_classes", "10", "--method.teacher", "test_resnet",
    "--bench.batch_size", "2", "--bench.device", "cpu",
]  # fmt: skip
DISTILLED = ["--method.distillation", "hard", "--method.teacher_img_size", "48"]
DINOV2_TINY = [
    "--method", "dinov2", *DINO_TINY[2:], "--bench.batch_size", "3",
    "--method.local_crops", "2", "--method.mask_sample_probability", "1",
]  # fmt: skip
SEPARATE_IBOT = ["--method.ibot_separate_head", "true", "--method.ibot_out_dim", "48"]
SEPARATE_IBOT += ["--method.ibot_hidden_dim", "24", "--method.ibot_bottleneck_dim", "8"]
SEGPROBE_TINY = ["--method", "segprobe", *TINY[2:14], *TINY[20:], "--bench.baseline", "false"]
SEGFINETUNE_TINY = ["--method", "segfinetune", *SEGPROBE_TINY[2:], "--method.num_classes", "7"]
SEGFINETUNE_TINY += ["--method.num_queries", "5", "--method.num_blocks", "1"]
SEGFINETUNE_TINY += [
    "--method.num_points",
    "16",
    "--method.anneal_start",
    "0",
    "--method.anneal_end",
    "4",
]
PATCH_16 = ["--model.img_size", "64", "--model.patch_size", "16"]  # EoMT upscales x2 twice
FLOP_CASES = {
    "mae": TINY,
    "dino": DINO_TINY,
    "dinov2": DINOV2_TINY,
    "dinov2_ibot_head": DINOV2_TINY + SEPARATE_IBOT,
    "deit": DEIT_TINY,
    "deit_distilled": DEIT_TINY + DISTILLED,
    "segprobe": SEGPROBE_TINY,
    "segprobe_dinov2": SEGPROBE_TINY + ["--method.variant", "dinov2"],
    "segfinetune": SEGFINETUNE_TINY,
    "segfinetune_patch_16": SEGFINETUNE_TINY + PATCH_16,
    "segfinetune_unmasked": SEGFINETUNE_TINY + ["--method.masked_attn", "false"],
    "segfinetune_linear": SEGFINETUNE_TINY + ["--method.head", "linear"],
}


def counted_step(module, batch, backward: bool) -> int:
    """FlopCounterMode's count of one training step's forward (and backward), attention on the
    math SDPA backend (`flops.flop_counter`) so that every torch version counts its matmuls."""
    from ssl_vit.flops import flop_counter

    torch.manual_seed(0)
    with flop_counter() as counter:
        loss = module.training_step(batch)["loss"]
        if backward:
            loss.backward()
    return counter.get_total_flops()


def built(argv: list[str], phase: str = "method"):
    """(root, module, its analytic StepFlops per image, a synthetic batch) of a tiny bench."""
    from bench import PHASES, configure, synthetic_batch

    root = configure(argv)
    torch.manual_seed(0)
    module = PHASES[phase].build(root).train()
    batch = synthetic_batch(root, torch.device("cpu"), 3)
    return root, module, PHASES[phase].count(root, module), batch


def uncounted_flops(case: str, root, batch) -> int:
    """The matmuls the analytic count leaves out as part of the loss. DINOv2's KoLeo similarity,
    (B, D) @ (D, B) per global crop, forward only (its nearest neighbours are found without
    gradient). EoMT's matching costs, without gradient: per image and prediction, (Q, P) @ (P, M)
    twice for the BCE (positives, negatives) and once for the dice, M the classes present, P
    the points."""
    b, d, m = root.bench.batch_size, root.model.embed_dim, root.method
    if case.startswith("dinov2"):
        return 2 * 2 * b * d * b
    if case.startswith("segfinetune") and m.head == "eomt":
        present = sum(len(classes) for _, classes in semantic_targets(batch["masks"]))
        predictions = m.num_blocks + 1 if m.masked_attn else 1
        return predictions * 3 * 2 * m.num_queries * m.num_points * present
    return 0


@pytest.mark.parametrize("case", [*FLOP_CASES, "full_token"])
def test_analytic_forward_flops_equal_flop_counter_mode(case):
    """Exact equality: both count 2 FLOPs per multiply-add of the same convolution, linear and
    SDPA calls and nothing else (norms, softmax, GELU, losses, Mixup are uncounted by both), so
    any difference is a missed or extra matmul; the teacher's share is FlopCounterMode's own
    count of one image (DeiT), the rest analytic; DINOv2's heads on the padded masked rows
    (whatever the draw: its seed) plus the loss's matmuls the count leaves out (uncounted_flops)."""
    argv = FLOP_CASES.get(case, TINY)
    root, module, count, batch = built(argv, "full_token" if case == "full_token" else "method")
    b = root.bench.batch_size
    with torch.no_grad():
        counted = counted_step(module, batch, backward=False)
    assert counted == pytest.approx(
        b * count.forward + uncounted_flops(case, root, batch), rel=1e-12
    )
    frozen = ("dino", "dinov2", "dinov2_ibot_head", "deit_distilled", "segprobe", "segprobe_dinov2")
    assert (count.frozen > 0) == (case in frozen)


def test_dinov2_flops_count_the_padded_rows_of_each_head():
    """2 x 3 global crops on 4 x 4 grids, all masked (probability 1), in 6 bins of 0.1-0.5: the
    rows padded to int(16 x 1/6 ...) = 2 + 3 + 4 + 5 + 6 + 8 = 28, run by the student's and the
    teacher's patch head; a separate iBOT head changes the count by that much."""
    from ssl_vit import flops

    root, _, shared, _ = built(DINOV2_TINY)
    _, _, separate, _ = built(DINOV2_TINY + SEPARATE_IBOT)
    m, d = root.method, root.model.embed_dim
    ibot = flops.linear(1, d, 24) + flops.linear(1, 24, 24) + flops.linear(1, 24, 8)
    ibot += flops.linear(1, 8, 48)
    dino = flops.dino_head_forward(d, m)
    assert separate.forward - shared.forward == pytest.approx(2 * 28 / 3 * (ibot - dino))


def depthwise_backward_excess(root, module) -> int:
    """What FlopCounterMode counts of the backward of EoMT's depthwise 3x3 convs (segfinetune)
    beyond the 2 x forward of the convention: torch's convolution-backward count ignores the
    groups, as if each channel saw every channel. Measured by FlopCounterMode on each conv alone,
    on its input shape, once per prediction."""
    m = root.method
    if root.method.name != "segfinetune" or m.head != "eomt":
        return 0
    b, side, excess = root.bench.batch_size, root.model.img_size // root.model.patch_size, 0
    for j, step in enumerate(module.head.upscale):
        x = torch.randn(b, step.conv.in_channels, side * 2 ** (j + 1), side * 2 ** (j + 1))
        with FlopCounterMode(display=False) as counter:
            step.conv(x.requires_grad_()).sum().backward()
        counts = counter.get_flop_counts()["Global"]
        conv = torch.ops.aten.convolution
        excess += counts[torch.ops.aten.convolution_backward] - 2 * counts[conv]
    return (m.num_blocks + 1 if m.masked_attn else 1) * excess


@pytest.mark.parametrize("case", [c for c in FLOP_CASES if not c.startswith("segprobe")])
def test_training_step_flops_are_3x_trained_forward_plus_frozen(case):
    """fwd + bwd counted by FlopCounterMode = 3 x trained forward + frozen forward, up to two
    documented, exactly computed departures: the patch embedding gets no input gradient (its
    backward is 1 x, not 2 x, its forward), and FlopCounterMode counts a depthwise conv's
    backward as an ungrouped one's (depthwise_backward_excess). Attention runs on the math
    backend, whose backward is two matmuls per forward one, as the model-FLOPs convention
    counts."""
    from ssl_vit import flops

    root, module, count, batch = built(FLOP_CASES[case])
    d, img, m = flops.ViTDims.of(module.backbone), root.model.img_size, root.method
    multi_crop = case.startswith("dino")
    sizes = [img] * 2 + [m.local_crop_size] * m.local_crops if multi_crop else [img]
    embed = sum(flops.patch_embed_forward(d, s) for s in sizes)
    expected = root.bench.batch_size * (count.train - embed) + uncounted_flops(case, root, batch)
    expected += depthwise_backward_excess(root, module)
    assert counted_step(module, batch, backward=True) == pytest.approx(expected, rel=1e-12)


def test_the_flop_oracle_counts_attention_by_hand():
    """The oracle (`flops.flop_counter`: FlopCounterMode, attention on the math SDPA backend)
    counts one attention call as q k^T + weights @ v = 2 x 2 B H T^2 d_head FLOPs, forward and
    2 x that backward, on every supported torch; FlopCounterMode alone counts 0 for CPU SDPA on
    torch 2.14. A timm ViT teacher, counted by `counted_forward_flops`, equals the analytic
    encoder plus its head."""
    import timm
    import torch.nn.functional as F

    from ssl_vit import flops

    b, h, t, dh = 2, 3, 17, 16
    q, k, v = (torch.randn(b, h, t, dh, requires_grad=True) for _ in range(3))
    with flops.flop_counter() as counter:
        out = F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * 2 * b * h * t * t * dh == 110_976
    with flops.flop_counter() as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 2 * 110_976

    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    with torch.device("meta"):
        vit = timm.create_model("vit_tiny_patch16_224", **kw)
    d = flops.ViTDims.of(vit)
    # 16 patches + cls; blocks by hand, then the 32 -> 10 head on the pooled token
    by_hand = 2 * 16 * 3 * 64 * 32 + 2 * block_flops(17, 32, 128) + 2 * 32 * 10
    assert flops.vit_forward(d, 32) + flops.linear(1, 32, 10) == by_hand
    assert flops.counted_forward_flops(vit, (1, 3, 32, 32)) == by_hand


def test_counted_forward_flops_of_a_small_cnn_by_hand():
    """The oracle on the meta device (no memory, no compute), as for a CNN teacher."""
    from torch import nn

    from ssl_vit.flops import counted_forward_flops

    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    conv = 2 * (8 * 8 * 8) * (3 * 3 * 3)  # 2 x output elements x (C_in k^2) multiply-adds
    assert counted_forward_flops(net, (2, 3, 8, 8)) == 2 * (conv + 2 * 512 * 10)


def test_step_flops_match_the_reference_anchors():
    """REFERENCE.md: training FLOPs per image of MAE ViT-B/16 (mask 0.75, 8 x 512 decoder) 58.7 G,
    DINO ViT-S/16 2 x 224 + 10 x 96 123.8 G, supervised ViT-B/16 105.4 G; ViT forward at 224:
    S 9.2 G, B 35.1 G (given to 0.1 G)."""
    from ssl_vit import flops
    from ssl_vit.methods.dino import DINOConfig
    from ssl_vit.methods.mae import MAEConfig

    vit_s = flops.vit_dims("vit_small_patch16_224")
    vit_b = flops.vit_dims("vit_base_patch16_224")
    assert (vit_b.embed_dim, vit_b.depth, vit_b.mlp_hidden, vit_b.patch_size) == (768, 12, 3072, 16)
    g = 1e9  # REFERENCE.md gives each anchor to 0.1 GFLOPs: within half of that
    assert flops.vit_forward(vit_s, 224) / g == pytest.approx(9.2, abs=0.05)
    assert flops.vit_forward(vit_b, 224) / g == pytest.approx(35.1, abs=0.05)
    assert flops.mae_flops(vit_b, 224, MAEConfig()).train / g == pytest.approx(58.7, abs=0.05)
    dino = flops.dino_flops(vit_s, 224, DINOConfig(local_crops=10))
    assert dino.train / g == pytest.approx(123.8, abs=0.05)
    assert flops.full_token_flops(vit_b, 224).train / g == pytest.approx(105.4, abs=0.05)


def test_mfu_arithmetic_and_device_peaks():
    from bench import BenchConfig, BenchRoot, PhaseResult, summarize

    from ssl_vit.flops import StepFlops, achieved_tflops, device_peak_tflops, mfu
    from ssl_vit.methods.mae import MAEConfig

    # 58.7 GFLOPs per image at 6,740 img/s on a 989 TFLOP/s peak: 395.6 TFLOP/s, 40 % MFU
    assert achieved_tflops(58.7e9, 6740) == pytest.approx(395.638)
    assert mfu(58.7e9, 6740, 989.0) == pytest.approx(0.40004, abs=1e-5)  # to 5 decimals
    assert mfu(58.7e9, 6740, None) is None
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == (989.0, "H100 SXM bf16 dense")
    assert device_peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.0
    assert device_peak_tflops("NVIDIA H200", "bf16")[0] == 989.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32")[0] == 19.5
    assert device_peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None
    assert device_peak_tflops("x86_64", "fp32") is None

    result = PhaseResult([0.5, 0.25, 0.25], 1.0, 900.0, "x86_64", 2, StepFlops(10**9, 10**8))
    # 8 images / 0.25 s = 32 img/s x 3.1 GFLOPs = 0.0992 TFLOP/s
    cpu = summarize(BenchRoot(BenchConfig(batch_size=8), method=MAEConfig()), "cpu", "fp32",
                    {"method": result})  # fmt: skip
    assert cpu["flops_per_img"] == 3.1e9 and cpu["forward_flops_per_img"] == 1.1e9
    assert cpu["tflops"] == pytest.approx(0.0992) and cpu["mfu"] is None  # no CPU peak guessed
    given = BenchRoot(BenchConfig(batch_size=8, peak_tflops=0.2), method=MAEConfig())
    m = summarize(given, "cpu", "fp32", {"method": result})
    assert m["mfu"] == pytest.approx(0.496) and m["peak_source"] == "--bench.peak_tflops"
    gpu = PhaseResult([0.25], 1.0, 900.0, "NVIDIA H100 PCIe", 2, StepFlops(10**9))
    m = summarize(BenchRoot(BenchConfig(batch_size=8), method=MAEConfig()), "cuda", "bf16",
                  {"method": gpu})  # fmt: skip
    assert m["peak_tflops"] == 756.0 and m["mfu"] == pytest.approx(0.096 / 756)


# ---------------------------------------------------------------------------------------------
# The real data pipeline: the loader alone, and the step it feeds (in this process: fast).


def test_loader_throughput_of_each_view():
    from bench import LOADER_METRICS, configure, run_loader, summarize, table

    argv = [*DINO_TINY, "--bench.modes", "loader", "--bench.loader_batches", "3",
            "--data.num_workers", "1", "--method.local_crops", "2"]  # fmt: skip
    root = configure(argv)
    loader = run_loader(root)
    assert list(loader) == ["mae", "dino", "deit"]
    m = summarize(root, "cpu", "fp32", {}, loader)
    assert m["loader_views"] == ["mae", "dino", "deit"] and m["num_workers"] == 1
    for view in loader:
        values = [m[f"loader_{view}_{k}"] for k in LOADER_METRICS]
        assert all(v > 0 and math.isfinite(v) for v in values)
        img_per_s, per_worker, batch_time = values
        assert per_worker == img_per_s  # one worker
        assert img_per_s == pytest.approx(root.bench.batch_size / batch_time)
    assert m["step_time_s"] is None and "img/s/worker" in table(m)


def test_e2e_step_feeds_the_method_from_its_real_view():
    from bench import configure, run_phase

    root = configure([*DINO_TINY, "--bench.modes", "e2e", "--data.num_workers", "0"])
    r = run_phase("e2e", root, "cpu", "fp32")
    assert len(r.step_times_s) == 2 and all(t > 0 for t in r.step_times_s)
    assert 1 < r.loss < 10  # cross-entropy over 64 outputs, as the compute step
    assert r.step_flops.frozen > 0  # the teacher's forward on the 2 globals


def test_decode_on_device_feeds_the_step_and_times_the_device_views():
    """With data.decode_on_device the loader's workers read bytes and the batch is decoded and
    augmented on the bench device before the step: the e2e step gets DINO's 2 + 10 crops from
    the device view; the loader mode times every view that way; a view the device cannot run
    (an AutoAugment policy) is refused before timing."""
    from bench import configure, real_batches, run_loader, run_phase, summarize, table

    flags = ["--data.decode_on_device", "true", "--data.num_workers", "0"]
    root = configure([*DINO_TINY, "--bench.modes", "e2e,loader", "--bench.loader_batches", "2",
                      *flags])  # fmt: skip
    batch = next(real_batches(root, root.method, 1, torch.device("cpu")))
    assert "encoded" not in batch and len(batch["crops"]) == 12
    assert [c.shape for c in batch["crops"]] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 10
    r = run_phase("e2e", root, "cpu", "fp32")
    assert len(r.step_times_s) == 2 and 1 < r.loss < 10
    m = summarize(root, "cpu", "fp32", {"e2e": r}, run_loader(root, "cpu"))
    assert m["decode_on_device"] and m["loader_on_device"] == ["mae", "dino", "deit"]
    assert all(m[f"loader_{v}_img_per_s"] > 0 for v in ("mae", "dino", "deit"))
    assert "dino (dev)" in table(m) and "deit (dev)" in table(m)
    from ssl_vit.config import ConfigError

    with pytest.raises(ConfigError, match="method.auto_augment 'original'"):
        configure(["--method", "deit", "--method.auto_augment", "original", "--bench.modes",
                   "e2e", *flags])  # fmt: skip


def test_bench_times_the_segmentation_probe_and_counts_its_flops(capsys):
    """`--method segprobe` (compute mode, a random backbone: the cost is the same with any
    weights): 150-class synthetic masks, a finite loss near ln(150) at init, and the training
    count = 3 x the head (a 1x1 conv of 48 features, 64 patches, 150 classes, by hand) + the
    frozen encoder's forward."""
    from ssl_vit import flops

    assert main(SEGPROBE_TINY) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["method"] == "segprobe" and m["method_config"]["num_classes"] == 150
    assert abs(m["loss"] - math.log(150)) < 0.5
    _, module, count, _ = built(SEGPROBE_TINY)
    head = 2 * 64 * 48 * 150
    encoder = flops.vit_forward(flops.ViTDims.of(module.backbone), 32)
    assert (count.trained, count.frozen) == (head, encoder)
    assert m["flops_per_img"] == pytest.approx(3 * head + encoder)
    assert main([*SEGPROBE_TINY, "--bench.modes", "e2e"]) == 2
    assert "bench.modes: segprobe is timed in the compute mode only" in capsys.readouterr().err


def test_bench_times_the_segmentation_fine_tune_and_counts_its_flops(capsys):
    """`--method segfinetune` (compute mode; EoMT with 5 queries on the last block, 7 classes):
    a finite loss, the training count 3 x the forward (backbone and head trained), and the
    EoMT head's share by hand: 64 patches of width 48, 2 predictions (before the query block
    and after it) of the mask MLP (3 x 2 x 5 x 48 x 48), the class head (2 x 5 x 48 x 8), the
    x2 upscaler (transposed conv 8 x 64 x 48^2, depthwise 3x3 2 x 9 x 48 x 256) and the masks
    (2 x 5 x 48 x 256), and the query block's 5 extra tokens."""
    from ssl_vit import flops

    assert main(SEGFINETUNE_TINY) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["method"] == "segfinetune" and m["method_config"]["num_queries"] == 5
    assert math.isfinite(m["loss"]) and m["loss"] > 0
    _, module, count, _ = built(SEGFINETUNE_TINY)
    d = flops.ViTDims.of(module.backbone)
    prediction = 3 * 2 * 5 * 48 * 48 + 2 * 5 * 48 * 8 + 8 * 64 * 48 * 48
    prediction += 2 * 9 * 48 * 256 + 2 * 5 * 48 * 256
    queries = flops.block_forward(65 + 5, 48, 192) - flops.block_forward(65, 48, 192)
    assert count.frozen == 0
    assert count.trained == flops.vit_forward(d, 32) + queries + 2 * prediction
    assert m["flops_per_img"] == pytest.approx(3 * count.trained)
