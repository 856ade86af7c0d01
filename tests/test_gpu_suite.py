"""tools/gpu_suite.py, the GPU figures in one call: its CPU rehearsal (--smoke) run end to end in
a subprocess, so that it cannot rot while no GPU is at hand, and every section's JSON checked
(img/s, MFU against a hand count, peak memory, ours / official, end to end / compute, the
2-process resume bit for bit); its skips and command-line errors in this process.

The official-code harness runs on stand-ins written here over our own modules (no official code
in the tests): they take the constructor arguments and answer the calls the harness makes of
the official files."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from gpu_suite import SECTIONS, Suite, main, parse

STAND_INS = {
    "mae/models_mae.py": """
import torch
from ssl_vit.backbone import Backbone
from ssl_vit.methods.mae import MAEConfig
from ssl_vit.registry import METHODS


class MaskedAutoencoderViT(torch.nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio,
                 decoder_embed_dim, decoder_depth, decoder_num_heads, norm_layer, norm_pix_loss):
        super().__init__()
        kw = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                  num_heads=num_heads)
        cfg = MAEConfig(decoder_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                        decoder_heads=decoder_num_heads, norm_pix_loss=norm_pix_loss)
        self.mae = METHODS["mae"].build(Backbone("vit_tiny_patch16_224", **kw), cfg)

    def forward(self, imgs, mask_ratio):
        return self.mae.training_step({"images": imgs})["loss"], None, None
""",
    "mae/util/misc.py": """
class NativeScalerWithGradNormCount:
    def __call__(self, loss, optimizer, parameters, update_grad):
        loss.backward()
        optimizer.step()
""",
    "mae/util/lr_sched.py": """
def adjust_learning_rate(optimizer, epoch, args):
    for group in optimizer.param_groups:
        group["lr"] = args.lr
""",
    "dino/vision_transformer.py": """
import torch
from ssl_vit.backbone import Backbone
from ssl_vit.methods.dino import DINOConfig, DINOHead as Head


class VisionTransformer(torch.nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                 norm_layer, drop_path_rate):
        super().__init__()
        self.vit = Backbone("vit_tiny_patch16_224", img_size=img_size[0], patch_size=patch_size,
                            embed_dim=embed_dim, depth=depth, num_heads=num_heads)

    def forward(self, x):
        return self.vit(x).tokens[:, 0]


def DINOHead(in_dim, out_dim, use_bn, hidden_dim, bottleneck_dim, norm_last_layer=True):
    cfg = DINOConfig(out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
    return Head(in_dim, cfg)
""",
    "dino/utils.py": """
import torch


class MultiCropWrapper(torch.nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        return self.head(torch.cat([self.backbone(c) for c in crops]))


def get_params_groups(model):
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def clip_gradients(model, clip):
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch < freeze_last_layer:
        for p in model.head.last_layer.parameters():
            p.grad = None
""",
    "dino/main_dino.py": """
import torch
from ssl_vit.methods.dino import cross_view_ce


class DINOLoss(torch.nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp, center_momentum):
        super().__init__()
        self.student_temp, self.teacher_temp = student_temp, teacher_temp

    def forward(self, student_output, teacher_output, epoch):
        q = torch.softmax(teacher_output / self.teacher_temp, dim=-1)
        return cross_view_ce(student_output, q, self.student_temp)
""",
    "deit/models.py": """
import torch
from ssl_vit.backbone import Backbone


class DistilledVisionTransformer(torch.nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                 norm_layer, num_classes, drop_rate, drop_path_rate):
        super().__init__()
        self.vit = Backbone("vit_tiny_patch16_224", img_size=img_size, patch_size=patch_size,
                            embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        self.head = torch.nn.Linear(embed_dim, num_classes)
        self.head_dist = torch.nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        tokens = self.vit(x).tokens
        return self.head(tokens[:, 0]), self.head_dist(tokens[:, 0])
""",
    "deit/losses.py": """
import torch
import torch.nn.functional as F


class DistillationLoss(torch.nn.Module):
    def __init__(self, base_criterion, teacher_model, distillation_type, alpha, tau):
        super().__init__()
        self.base, self.teacher, self.kind, self.alpha = (
            base_criterion, teacher_model, distillation_type, alpha)

    def forward(self, inputs, outputs, labels):
        if self.kind == "none":
            return self.base(outputs, labels)
        with torch.no_grad():
            hard = self.teacher(inputs).argmax(dim=1)
        cls, dist = outputs
        return (1 - self.alpha) * self.base(cls, labels) + self.alpha * F.cross_entropy(dist, hard)
""",
}


def write_stand_ins(folder: Path) -> Path:
    """The stand-ins in the layout tools/official_code.sh writes, each family's COMMIT
    "stand-in"; `folder`."""
    for name, text in STAND_INS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    for family in ("mae", "dino", "deit"):
        (folder / family / "COMMIT").write_text("stand-in\n")
    return folder


PEAK = 0.5
"""The nominal device peak (TFLOP/s) the smoke's MFU is computed against (a CPU has none)."""


def block_flops(t: int, d: int, h: int) -> int:
    """A pre-norm ViT block on t tokens of width d, MLP width h, by hand: qkv 6td^2, proj 2td^2,
    MLP 4tdh, attention q k^T and weights @ v 4t^2d (2 FLOPs per multiply-add)."""
    return 8 * t * d * d + 4 * t * d * h + 4 * t * t * d


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`tools/gpu_suite.py --smoke` with --official pointing to the stand-ins: (its files by
    section name, the summary it printed)."""
    tmp = tmp_path_factory.mktemp("suite")
    write_stand_ins(tmp / "official")
    out = tmp / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_suite.py"), "--smoke", "--out", str(out)]
    cmd += ["--official", str(tmp / "official"), "--peak_tflops", str(PEAK)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, "stdout holds the summary alone"
    files = {p.stem.split("_", 1)[1]: json.loads(p.read_text()) for p in out.glob("[0-9]*.json")}
    files["environment"] = json.loads((out / "environment.json").read_text())
    summary = json.loads(lines[0])
    assert json.loads((out / "summary.json").read_text()) == summary
    return files, summary


def test_the_smoke_runs_every_section_and_records_its_figures(smoke):
    files, summary = smoke
    names = [s.name for s in SECTIONS]
    assert [r["section"] for r in summary["sections"]] == names
    assert [r["file"] for r in summary["sections"]] == [
        f"{i:02d}_{n}.json" for i, n in enumerate(names, 1)
    ]
    for name in names:
        assert files[name]["status"] == "ok", files[name].get("reason")
    assert files["environment"]["cuda_available"] is False and summary["smoke"] is True
    steps = [n for n in names if n != "resume_2proc"]
    for name in steps:
        m = files[name]
        assert (m["device"], m["precision"], m["batch_size"], m["steps"]) == ("cpu", "fp32", 4, 2)
        assert m["img_per_s"] == pytest.approx(4 / m["step_time_s"]) and m["img_per_s"] > 0
        # MFU = training FLOPs per image x img/s / peak, from the analytic count
        assert m["flops_per_img"] > 0 and m["peak_tflops"] == PEAK
        assert m["mfu"] == pytest.approx(m["flops_per_img"] * m["img_per_s"] / (PEAK * 1e12))
        assert 50 < m["peak_mem_mib"] < 1e5  # the process's peak RSS: torch alone is ~300 MiB
        assert math.isfinite(m["loss"]) and 0 < m["loss"] < 20
    # MAE's FLOPs by hand: 16 patches of 8 px (embedding 2 x 16 x 192 x 32), encoder (2 blocks,
    # width 32, MLP 128) on cls + the 4 kept; decoder embed on 5 tokens, 1 block on 17, the
    # 32 -> 192 pixel head on 17; training = 3 x forward
    encoder = 2 * 16 * 192 * 32 + 2 * block_flops(5, 32, 128)
    decoder = 2 * 5 * 32 * 32 + block_flops(17, 32, 128) + 2 * 17 * 32 * 192
    assert files["mae"]["flops_per_img"] == 3 * (encoder + decoder) == 3_368_064
    assert files["mae_compiled"]["flops_per_img"] == files["official_mae"]["flops_per_img"]
    assert files["mae_compiled"]["compile"] and files["mae_compiled"]["compile_backend"] == "eager"
    dino = files["dino"]
    assert dino["method_config"]["local_crops"] == 10 and dino["clip_mode"] == "param"
    assert dino["flops_per_img"] == files["official_dino"]["flops_per_img"]
    assert "python tools/bench.py --method dino" in dino["command"]


def test_the_official_steps_are_timed_against_ours(smoke):
    """The harness ran the code in --official (the stand-ins: their COMMIT file) at our batch
    and precision; ours / official is our eager step's img/s over theirs; the goal takes the
    best of ours (eager or compiled)."""
    files, summary = smoke
    goals = {g["goal"]: g for g in summary["goals"]}
    for family in ("mae", "dino"):
        official, ours = files[f"official_{family}"], files[family]
        assert official["official_commit"] == "stand-in" and official["shims"] is not None
        assert official["official_code"].endswith(f"official/{family}")
        assert official["batch_size"] == ours["batch_size"] and official["img_per_s"] > 0
        assert official["ours_img_per_s"] == ours["img_per_s"]
        assert official["ours_over_official"] == pytest.approx(
            ours["img_per_s"] / official["img_per_s"]
        )
        best = max(ours["img_per_s"], files[f"{family}_compiled"]["img_per_s"])
        goal = goals[f"{family}_over_official"]
        assert goal["value"] == pytest.approx(best / official["img_per_s"])
        assert (goal["target"], goal["met"]) == (3.0, None)  # goals are judged on a GPU only
    assert "models_mae.Block" not in " ".join(files["official_mae"]["shims"])  # no timm Block
    official, ours = files["official_deit"], files["deit_b"]  # DeiT-B: no goal, the ratio
    assert official["official_commit"] == "stand-in" and official["flops_per_img"] > 0
    assert official["flops_per_img"] == ours["flops_per_img"]  # supervised: no teacher counted
    ratio = ours["img_per_s"] / official["img_per_s"]
    assert official["ours_over_official"] == pytest.approx(ratio)
    assert official["minor_faults"] >= 0 and "NativeScaler" in " ".join(official["shims"])


def test_end_to_end_is_set_against_compute_and_the_resume_is_exact(smoke):
    """The end-to-end sections read the generated JPEGs through the trainer's loader, decoded on
    the device (the CPU here), beside the compute-only step; the 2-process run resumed at step
    3 ends with the straight run's parameters and losses, bit for bit."""
    files, summary = smoke
    goals = {g["goal"]: g["value"] for g in summary["goals"]}
    for family in ("mae", "dino"):
        m = files[f"e2e_{family}"]
        assert m["decode_on_device"] and m["num_workers"] == 1 and m["jpegs"] == 8
        assert m["e2e_img_per_s"] == pytest.approx(4 / m["e2e_step_time_s"])
        fraction = m["e2e_img_per_s"] / m["img_per_s"]
        assert m["e2e_img_per_s_over_compute"] == pytest.approx(fraction)
        assert goals[f"{family}_e2e_over_compute"] == pytest.approx(fraction)
        assert math.isfinite(m["e2e_loss"])
    goals_mfu = goals["mae_mfu"]
    assert goals_mfu == max(files["mae"]["mfu"], files["mae_compiled"]["mfu"])
    r = files["resume_2proc"]
    assert (r["processes"], r["backend"], r["steps"], r["resumed_from_step"]) == (2, "gloo", 6, 3)
    assert r["resumed_logged_from_step"] == 4  # the resumed run began after the checkpoint
    assert r["params_equal"] and r["max_abs_param_diff"] == 0.0
    assert r["losses_equal"] and len(r["losses_resumed"]) == 3
    assert all(math.isfinite(x) for x in r["losses_resumed"])


def test_sections_that_cannot_run_are_recorded_as_skipped(tmp_path):
    """No --official: the official sections are skipped, saying what writes the folder; on a
    GPU, a section whose estimate does not fit in what is left of the budget is skipped (neither
    starts a process)."""
    suite = Suite(parse(["--smoke", "--out", str(tmp_path)]))
    shutil.rmtree(suite.work)  # its scratch folder: unused here
    suite.run(4, SECTIONS[3])
    record = json.loads((tmp_path / "04_official_mae.json").read_text())
    assert record["status"] == "skipped" and "tools/official_code.sh" in record["reason"]
    gpu = Suite(parse(["--out", str(tmp_path), "--budget_s", "60"]))
    shutil.rmtree(gpu.work)
    gpu.run(7, SECTIONS[6])  # mae_compiled: 150 s estimated
    record = json.loads((tmp_path / "07_mae_compiled.json").read_text())
    assert record["status"] == "skipped" and "> the 60 s budget" in record["reason"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["status"] for r in summary["sections"]] == ["skipped"]
    assert all(g["value"] is None for g in summary["goals"])


def test_bad_command_lines_are_refused_by_name(tmp_path, capsys):
    assert main(["--smoke", "--out", str(tmp_path), "--official", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert f"--official {tmp_path / 'nope'}: {tmp_path / 'nope' / 'mae' / 'models_mae.py'}" in err
    assert "tools/official_code.sh" in err
    assert main(["--smoke", "--out", str(tmp_path), "--sections", "mae,mea"]) == 2
    assert "--sections: unknown section 'mea'" in capsys.readouterr().err
    assert main(["--smoke", "--out", str(tmp_path), "--budget_s", "0"]) == 2
    assert "--budget_s: must be > 0" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))  # refused before anything ran


def test_the_official_code_is_extracted_not_committed():
    """tools/official_code.sh writes official/, which git ignores: their code never lands in the
    repository."""
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "official/mae/models_mae.py"], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0
    assert Path(ROOT / "tools" / "official_code.sh").stat().st_mode & 0o111  # executable


def test_cpu_pairs_times_ours_against_the_official_steps_in_turn(tmp_path):
    """tools/cpu_pairs.py --smoke on the stand-ins: per workload, each pair's ratio ours /
    official of the median step time, their median as the figure, and both sides' minor faults;
    the DeiT pair distils from a teacher on both sides."""
    folder = write_stand_ins(tmp_path / "official")
    out = tmp_path / "pairs.json"
    cmd = [sys.executable, str(ROOT / "tools" / "cpu_pairs.py"), "--smoke", "--pairs", "2"]
    cmd += ["--official", str(folder), "--workloads", "mae,deit", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [json.loads(line) for line in done.stdout.strip().splitlines()] == results
    assert [r["workload"] for r in results] == ["mae", "deit"]
    for r in results:
        assert r["pairs"] == len(r["ratios"]) == 2 and all(x > 0 for x in r["ratios"])
        assert r["ours_over_official"] == pytest.approx(sum(r["ratios"]) / 2, rel=1e-3)
        assert r["settings"]["bench.batch_size"] == 4 and r["settings"]["bench.device"] == "cpu"
        assert r["ours_minor_faults"] >= 0 and r["official_minor_faults"] >= 0
    assert results[1]["settings"]["method.distillation"] == "hard"
    assert "NativeScaler" in " ".join(results[1]["official_shims"])
    assert done.stderr.count("cpu_pairs: deit pair") == 2


def test_cpu_pairs_refuses_bad_command_lines_by_name(tmp_path, capsys):
    from cpu_pairs import main as pairs

    folder = write_stand_ins(tmp_path / "official")
    (folder / "deit" / "losses.py").unlink()
    assert pairs(["--official", str(folder), "--workloads", "mae,deit,mea", "--pairs", "0"]) == 2
    err = capsys.readouterr().err
    assert "--pairs: must be > 0, got 0" in err
    assert f"--official {folder}: {folder / 'deit' / 'losses.py'} not found" in err
    assert "--workloads: unknown workload 'mea'" in err
