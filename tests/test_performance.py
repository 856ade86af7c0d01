"""Speed by default: one torch.compile compilation per run, no host sync per step, activation
checkpointing that changes nothing but memory, FSDP through configs/fsdp.yaml (run on 2 CPU
processes), and the fast kernels switched on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import ROOT, TINY_METHODS, TINY_MODEL, metrics, overrides, tiny
from launched_runs import fsdp_on_cpu
from safetensors.torch import load_file
from torch._dynamo.backends.registry import lookup_backend, register_backend
from torch._dynamo.utils import counters

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config
from ssl_vit.methods.mae import MAE, MAEConfig
from ssl_vit.optim import build_optimizer
from ssl_vit.train.loop import fit

from tolerances import GRAD_NORM_RTOL, LOSS_RTOL, TRAINED

TINY_MAE = TINY_METHODS["mae"]


# ---------------------------------------------------------------------------------------------
# torch.compile: the graphs dynamo compiles, counted by backends that hand them on to aot_eager
# (forward and backward traced as inductor gets them, without inductor's C++ build time) or eager

COMPILED: list[int] = []
"""Number of FX nodes of each graph a counting backend was given, in order."""


def counting(then: str) -> None:
    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        COMPILED.append(len(gm.graph.nodes))
        return lookup_backend(then)(gm, example_inputs)

    register_backend(backend, name=f"counting_{then}")


counting("aot_eager")
counting("eager")


@pytest.fixture
def dynamo():
    """A fresh dynamo that raises on any recompilation; yields the compiled-graph list."""
    torch._dynamo.reset()
    counters.clear()
    COMPILED.clear()
    config = torch._dynamo.config  # torch 2.7 renamed cache_size_limit to recompile_limit
    limits = (
        dict(recompile_limit=1, fail_on_recompile_limit_hit=True)
        if hasattr(config, "recompile_limit")
        else dict(cache_size_limit=1, fail_on_cache_limit_hit=True)
    )
    with config.patch(**limits):
        yield COMPILED
    torch._dynamo.reset()


def test_compiled_mae_compiles_once_and_trains_as_eager(tmp_path, dynamo):
    # 4 optimizer steps x 2 accumulated micro-batches: 8 calls of the compiled step
    kw = dict(epochs=1, warmup_epochs=0, batch_size=4, accum_steps=2)
    eager = fit(tiny(tmp_path / "eager", **kw))
    compiled = fit(
        tiny(tmp_path / "compiled", compile=True, compile_backend="counting_aot_eager", **kw)
    )
    assert compiled["steps"] == eager["steps"] == 4
    assert len(dynamo) == 1 and dynamo[0] > 100  # one graph: masking, encoder, decoder, loss
    assert dict(counters["graph_break"]) == {}
    assert counters["frames"]["ok"] == 1
    # aot_eager runs the same aten ops: the losses match the eager run's
    for a, b in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)  # same ops: a few roundings


def test_compiled_dino_compiles_once_for_both_crop_resolutions(tmp_path, dynamo):
    # 2 epochs: the teacher temperature and the frozen-last-layer phase change on the way
    cfg = tiny(
        tmp_path / "run",
        "dino",
        epochs=2,
        warmup_epochs=0,
        compile=True,
        compile_backend="counting_eager",
    )
    cfg.method.warmup_teacher_temp_epochs = 1
    cfg.method.teacher_temp = 0.07
    result = fit(cfg)
    assert result["steps"] == 8
    # globals (32 px) and locals (16 px) of the student and the teacher's globals: one graph
    assert len(dynamo) == 1
    assert dict(counters["graph_break"]) == {}
    temps = [m["teacher_temp"] for m in metrics(tmp_path / "run")]
    assert temps[0] == pytest.approx(0.04) and temps[-1] == pytest.approx(0.07)


def test_compiled_dinov2_compiles_once_and_trains_as_eager(tmp_path, dynamo):
    """The masked-patch rows padded to a bound fixed by the shapes and config: steps whose draws
    mask different numbers of patches run one graph (globals, masked globals, locals, both
    heads, Sinkhorn-Knopp, the losses), with no recompilation; the host-side mask draw is its
    only graph break, taken before any tensor op."""
    kw = dict(epochs=1, warmup_epochs=0, batch_size=4, accum_steps=2)
    eager = fit(tiny(tmp_path / "eager", "dinov2", **kw))
    compiled = fit(
        tiny(
            tmp_path / "compiled",
            "dinov2",
            compile=True,
            compile_backend="counting_aot_eager",
            **kw,
        )
    )
    assert compiled["steps"] == eager["steps"] == 4
    assert len(dynamo) == 1 and dynamo[0] > 100
    assert len(counters["graph_break"]) == 1
    assert "torch.compiler.disable" in next(iter(counters["graph_break"]))
    rows = metrics(tmp_path / "compiled")
    assert len({m["masked_share"] for m in rows}) > 1  # the draws differ from step to step
    for a, b in zip(metrics(tmp_path / "eager"), rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)  # same ops: a few roundings


# ---------------------------------------------------------------------------------------------
# No host synchronisation per step


def test_host_reads_happen_only_at_log_steps(tmp_path, monkeypatch):
    """Every read of a tensor's value on the host (.item(), float(), bool(), ...) made by the
    training code (ssl_vit outside data loading) is counted: 2 steps logged every step and 4
    steps logged every 2 make the same reads, so none of them happens per step."""
    reads: Counter[str] = Counter()
    package = str(ROOT / "ssl_vit")

    def recorder(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package) and "/data/" not in caller:
                line = sys._getframe(1).f_lineno
                reads[f"{Path(caller).name}:{line} {name}"] += 1
            return original(self, *args, **kwargs)

        return read

    names = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
    for name in names:
        monkeypatch.setattr(torch.Tensor, name, recorder(name))
    kw = dict(batch_size=4, epochs=1, warmup_epochs=0)
    fit(tiny(tmp_path / "short", "dino", max_steps=2, log_every=1, **kw))
    short = dict(reads)
    reads.clear()
    fit(tiny(tmp_path / "long", "dino", max_steps=4, log_every=2, **kw))
    assert dict(reads) == short
    # the logged loss (with the divergence flag), grad norm and DINO's 6 monitors at each of the
    # 2 log steps; one at the final checkpoint (whether the weights and the flag are finite)
    assert sum(short.values()) == 2 * (1 + 1 + 6) + 1, short


# ---------------------------------------------------------------------------------------------
# Activation checkpointing


def test_grad_checkpointing_run_is_identical(tmp_path):
    """With drop path: the recomputation in backward draws the same drop-path masks."""
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    for run_dir, on in ((plain, False), (checkpointed, True)):
        cfg = tiny(run_dir, epochs=1, warmup_epochs=0, max_steps=3)
        cfg.model.drop_path, cfg.model.grad_checkpointing = 0.2, on
        fit(cfg)
    assert "activation checkpointing" in (checkpointed / "train.log").read_text()
    assert [m["loss"] for m in metrics(plain)] == [m["loss"] for m in metrics(checkpointed)]
    a = load_file(str(plain / "backbone" / "model.safetensors"))
    b = load_file(str(checkpointed / "backbone" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Fast kernels by default


def test_fused_attention_and_fused_adamw():
    mae = MAE(Backbone(**TINY_MODEL), MAEConfig(**TINY_MAE))
    blocks = [*mae.backbone.blocks, *mae.decoder_blocks]
    assert all(b.attn.fused_attn for b in blocks)  # timm runs F.scaled_dot_product_attention
    adamw = build_optimizer(mae.param_groups(0.05), "adamw")
    assert adamw.defaults["fused"] is True  # CPU and CUDA


# ---------------------------------------------------------------------------------------------
# FSDP (configs/fsdp.yaml) on 2 CPU processes


FAULTS_AFTER = """
import resource, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
if sys.argv[1] == "fit":  # a tiny CPU training run first, in this process
    from conftest import tiny
    from ssl_vit.train.loop import fit
    fit(tiny(Path(sys.argv[2]), "mae", epochs=1))
for i in range(6):  # a step's life of a 64 MiB activation: allocated, written, freed
    if i == 2:  # steady state: the heap may grow once more to fit the block's alignment
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_a_cpu_training_process_keeps_freed_memory_for_the_next_step(tmp_path):
    """After `fit` on the CPU, a 64 MiB block freed and allocated again is not faulted in again
    page by page (keep_freed_memory): without it, each of 4 re-allocations (after 2 that let the
    heap settle) faults its 16,384 pages (4 KiB) in anew, as a DINO head's weight and gradient
    do every step."""
    script = FAULTS_AFTER.format(tests=str(ROOT / "tests"))

    def faults(*args: str) -> int:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-c", script, *args]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().splitlines()[-1])

    default, kept = faults("none"), faults("fit", str(tmp_path / "run"))
    assert kept * 20 < default, f"{kept} minor faults after fit, {default} without it"


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(ROOT / "configs" / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.mixed_precision == "bf16"
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Block"
    ddp = load_config_from_file(str(ROOT / "configs" / "ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.mixed_precision == "bf16"


def launch_fsdp(cfg: Config) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(ROOT / "configs" / "fsdp.yaml"), "--num_processes", "2"]
    cmd += ["--main_process_port", "0", __file__]  # any free port: suites may run side by side
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, *overrides(cfg)], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_fsdp_on_two_processes_equals_one_process(tmp_path, method):
    """MAE, and DINO with its EMA teacher updated shard by shard and per-parameter clipping (on
    sharded gradients); no drop path, whose draws depend on the per-process batch."""
    k = 3
    kw = dict(max_steps=k, epochs=4)
    if method == "dino":
        kw |= dict(clip_grad=0.3, clip_mode="param", weight_decay=0.04, weight_decay_end=0.4)
    one = tiny(tmp_path / "one", method, batch_size=8, **kw)
    fit(one)
    two = tiny(tmp_path / "two", method, batch_size=4, eval_every_epochs=1, **kw)
    out = launch_fsdp(two)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "x 2 processes" in out.stderr and "distributed FSDP" in out.stderr
    # each process saved its own shard of the model and of the optimizer state
    ckpt = tmp_path / "two" / "checkpoints" / f"step_{k:07d}"
    assert sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert len(list((ckpt / "optimizer_0").glob("*.distcp"))) == 2
    rows_one, rows_two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(rows_two) == k
    for m1, m2 in zip(rows_one, rows_two, strict=True):
        assert m2["lr"] == m1["lr"] and torch.isfinite(torch.tensor(m2["loss"]))
        assert m2["loss"] == pytest.approx(m1["loss"], rel=LOSS_RTOL)
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=GRAD_NORM_RTOL)
    # the exported backbone (DINO: the EMA teacher's) gathered from the shards
    a = load_file(str(tmp_path / "one" / "backbone" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "backbone" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], **TRAINED)
    # k-NN evaluation at the end runs on the sharded model
    final = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= final["final"]["knn_top1"] <= 100


if __name__ == "__main__":  # one process of launch_fsdp
    fsdp_on_cpu()
    from ssl_vit.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
