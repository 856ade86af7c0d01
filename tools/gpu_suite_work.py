"""What tools/gpu_suite.py's processes run: every function here is called in a process of its
own, forked from a server that imported torch and the package once, and returns plain data (the
suite's own process imports none of this, so that it never touches the GPU).

Our steps are tools/bench.py's phases; the official MAE, DINO and DeiT steps are built from
their code (read at run time from the folder tools/official_code.sh writes, never copied here)
and timed by the same loop, bench.time_steps; the 2-process resume runs the trainer itself, one
process a rank.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import platform
import resource
import sys
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import accelerate
import bench
import numpy as np
import timm
import torch
import torch.distributed as dist
import torchvision
from bench import PhaseResult
from safetensors.torch import load_file
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer
from timm.utils import ModelEma, NativeScaler
from torch import Tensor, nn
from write_images import write_image_folder

from ssl_vit import flops
from ssl_vit.config import Config, DataConfig, ModelConfig, TrainConfig
from ssl_vit.methods.mae import MAEConfig
from ssl_vit.train.loop import fit

TINY_MODEL = dict(
    name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
)
"""The smoke's encoder of the resume round trip (the suite's TINY_MODEL)."""


def environment() -> dict[str, Any]:
    """Versions, the device and its peak."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "device_name": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {
            "device_name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(),
            "peak_tflops_bf16": flops.device_peak_tflops(p.name, "bf16"),
        }
    return info


# ---------------------------------------------------------------------------------------------
# Our steps: tools/bench.py's phases.


def our_steps(argv: list[str], phases: list[str]) -> dict[str, Any]:
    """bench's metrics of `phases` ("method": the compute step, "e2e": fed by the loader) of the
    bench command line `argv`, run one after the other in this process (on CUDA each phase's
    peak memory is its own; on the CPU the process's peak RSS so far)."""
    root = bench.configure(argv)
    device, precision = bench.resolve(root.bench)
    results = {p: bench.run_phase(p, root, device, precision) for p in phases}
    command = ["python", "tools/bench.py", *argv, "--bench.baseline", "false"]
    return bench.summarize(root, device, precision, results) | {"command": " ".join(command)}


def write_jpegs(folder: str, n: int, size: int) -> str:
    """The JPEG folder of the end-to-end sections: n synthetic size x size images."""
    return str(write_image_folder(folder, n, size))


# ---------------------------------------------------------------------------------------------
# The official steps: their code, read at run time from --official DIR, timed by the same loop.


def official_steps(name: str, folder: str, argv: list[str]) -> dict[str, Any]:
    """bench's metrics of the official step of `name` (mae, dino, deit) at the batch, sizes and
    precision of the bench command line `argv`, timed by bench.time_steps; its FLOPs are ours
    (the same architecture, a DeiT teacher counted as ours counts it); with the shims its code
    needed and the median minor page faults of a step."""
    root = bench.configure(argv)
    device, precision = bench.resolve(root.bench)
    dev = torch.device(device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as their main_pretrain.py, main_dino.py, main.py set it
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    dims = flops.vit_dims(root.model.name, **root.model.timm_kwargs())  # before their code:
    teacher = deit_teacher_flops(root) if name == "deit" else 0  # DeiT's registers timm names
    b = root.bench.batch_size
    count = flops.step_flops(dims, root.model.img_size, root.method, teacher, b)
    build = {"mae": official_mae_step, "dino": official_dino_step, "deit": official_deit_step}
    official, shims = build[name](Path(folder) / name, root, dev, precision)
    faults = []

    def step(i: int) -> Tensor:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss = official(i)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return loss

    times, loss = bench.time_steps(step, root.bench.warmup, root.bench.steps, dev)
    peak, device_name = bench.peak_memory_mib(dev), bench.device_name(dev)
    threads = torch.get_num_threads()
    result = PhaseResult(
        times, float(loss), peak, device_name, threads, count, faults[root.bench.warmup :]
    )
    commit = Path(folder) / name / "COMMIT"
    return bench.summarize(root, device, precision, {"method": result}) | {
        "official_code": str(Path(folder) / name),
        "official_commit": commit.read_text().strip() if commit.exists() else None,
        "shims": shims,
    }


def import_official(folder: Path, modules: tuple[str, ...]) -> list[Any]:
    """`modules` imported from `folder` (put first on sys.path): their code as it is."""
    sys.path.insert(0, str(folder))
    return [importlib.import_module(m) for m in modules]


def restore_removed_names() -> list[str]:
    """Put back the two names MAE's 2021 code uses that today's numpy and torch removed (where
    they did); what was restored. Nothing of theirs is edited or copied."""
    shims = []
    if not hasattr(np, "float"):
        np.float = float  # MAE's util/pos_embed.py: removed in numpy 1.24
        shims.append("numpy.float = float (removed in numpy 1.24; MAE's util/pos_embed.py)")
    if "torch._six" not in sys.modules:
        try:
            importlib.import_module("torch._six")
        except ImportError:
            six = types.ModuleType("torch._six")
            six.inf = math.inf
            sys.modules["torch._six"] = six  # MAE's util/misc.py: `from torch._six import inf`
            shims.append("torch._six.inf = math.inf (torch._six removed in torch 2.0)")
    return shims


def timm_block_without_qk_scale(*args: Any, qk_scale: Any = None, **kwargs: Any) -> nn.Module:
    """timm's Block, called as MAE's code calls the 0.3 one (qk_scale=None: the default scale)."""
    return timm.models.vision_transformer.Block(*args, **kwargs)


def encoder_shape(root: bench.BenchRoot) -> dict[str, Any]:
    """Width, depth, heads, MLP ratio and patch of the run's encoder (timm's, on the meta
    device), as the official constructors take them."""
    with torch.device("meta"):
        vit = timm.create_model(root.model.name, num_classes=0, **root.model.timm_kwargs())
    d = vit.embed_dim
    return {
        "img_size": root.model.img_size,
        "patch_size": vit.patch_embed.patch_size[0],
        "embed_dim": d,
        "depth": len(vit.blocks),
        "num_heads": vit.blocks[0].attn.num_heads,
        "mlp_ratio": vit.blocks[0].mlp.fc1.out_features / d,
    }


def autocast(dev: torch.device, precision: str) -> Any:
    """bf16 autocast as Accelerate's on our side (the official code's own is fp16 only)."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def official_mae_step(
    folder: Path, root: bench.BenchRoot, dev: torch.device, precision: str
) -> tuple[Callable[[int], Tensor], list[str]]:
    """MAE's step as its engine_pretrain.py runs it, one GPU: their per-iteration lr, forward
    under autocast, their finite-loss check (a host sync), their loss scaler's backward, gradient
    norm and AdamW step (timm's weight-decay groups, the method's betas), zero_grad. The scaler's
    fp16 loss scaling is off: bf16 and fp32 need none."""
    shims = restore_removed_names()
    models_mae, misc, lr_sched = import_official(
        folder, ("models_mae", "util.misc", "util.lr_sched")
    )
    block = getattr(models_mae, "Block", None)
    if block is timm.models.vision_transformer.Block and (
        "qk_scale" not in inspect.signature(block).parameters
    ):
        models_mae.Block = timm_block_without_qk_scale  # their models_mae.py passes qk_scale=None
        shims.append("models_mae.Block drops qk_scale=None (timm >= 0.9 has no qk_scale)")
    cfg, shape = root.method, encoder_shape(root)
    model = models_mae.MaskedAutoencoderViT(
        **shape,
        decoder_embed_dim=cfg.decoder_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_heads,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss=cfg.norm_pix_loss,
    ).to(dev)
    model.train()
    weight_decay = bench.run_config(root).train.weight_decay
    groups = timm.optim.param_groups_weight_decay(model, weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=bench.LR, betas=cfg.betas)
    scaler = misc.NativeScalerWithGradNormCount()
    if hasattr(scaler, "_scaler"):
        scaler._scaler = torch.amp.GradScaler(dev.type, enabled=False)
        shims.append("their fp16 GradScaler disabled (bf16 / fp32: no loss scaling)")
    total = root.bench.warmup + root.bench.steps  # one step an epoch, as bench.py's schedule
    schedule = SimpleNamespace(lr=bench.LR, min_lr=0.0, warmup_epochs=0, epochs=total)
    images = bench.synthetic_batch(root, dev, 3)["images"]

    def step(i: int) -> Tensor:
        lr_sched.adjust_learning_rate(optimizer, i, schedule)
        with autocast(dev, precision):
            loss, _, _ = model(images, mask_ratio=cfg.mask_ratio)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the official MAE step's loss is {loss.item()}")
        scaler(loss, optimizer, parameters=model.parameters(), update_grad=True)
        optimizer.zero_grad()
        return loss.detach()

    return step, shims


def official_dino_step(
    folder: Path, root: bench.BenchRoot, dev: torch.device, precision: str
) -> tuple[Callable[[int], Tensor], list[str]]:
    """DINO's step as main_dino.py's train_one_epoch runs it, one process: their lr and weight
    decay written to the groups, teacher on the 2 globals and student on every crop through
    their MultiCropWrapper under autocast, their DINOLoss (whose center is all-reduced over a
    group of this one process), their finite-loss check, backward, their per-parameter clipping
    (train.clip_grad) and last-layer freeze (step 0 only: one step an epoch, as bench.py), AdamW
    (their param groups, default betas), the teacher's EMA, parameter by parameter as theirs.
    Without DDP, as our step on one device."""
    vits, utils, main_dino = import_official(folder, ("vision_transformer", "utils", "main_dino"))
    shims: list[str] = []
    cfg, shape = root.method, encoder_shape(root)
    total = root.bench.warmup + root.bench.steps

    def network(drop_path: float) -> nn.Module:
        return vits.VisionTransformer(
            img_size=[shape["img_size"]],
            patch_size=shape["patch_size"],
            embed_dim=shape["embed_dim"],
            depth=shape["depth"],
            num_heads=shape["num_heads"],
            mlp_ratio=shape["mlp_ratio"],
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            drop_path_rate=drop_path,
        )

    head = partial(
        vits.DINOHead,
        shape["embed_dim"],
        cfg.out_dim,
        use_bn=cfg.use_bn_in_head,
        hidden_dim=cfg.hidden_dim,
        bottleneck_dim=cfg.bottleneck_dim,
    )
    student = utils.MultiCropWrapper(
        network(root.model.drop_path), head(norm_last_layer=cfg.norm_last_layer)
    ).to(dev)
    teacher = utils.MultiCropWrapper(network(0.0), head()).to(dev)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    dino_loss = main_dino.DINOLoss(
        cfg.out_dim,
        2 + cfg.local_crops,
        cfg.warmup_teacher_temp,
        cfg.teacher_temp,
        cfg.warmup_teacher_temp_epochs,
        total,
        cfg.student_temp,
        cfg.center_momentum,
    ).to(dev)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    weight_decay, m = bench.run_config(root).train.weight_decay, cfg.momentum_teacher
    crops = bench.synthetic_batch(root, dev, 3)["crops"]
    student.train()

    def step(i: int) -> Tensor:
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = bench.LR
            if j == 0:
                group["weight_decay"] = weight_decay
        with autocast(dev, precision):
            teacher_output = teacher(crops[:2])  # the 2 globals, first, as theirs
            loss = dino_loss(student(crops), teacher_output, i)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the official DINO step's loss is {loss.item()}")
        optimizer.zero_grad()
        loss.backward()
        if root.train.clip_grad:
            utils.clip_gradients(student, root.train.clip_grad)
        utils.cancel_gradients_last_layer(i, student, cfg.freeze_last_layer)
        optimizer.step()
        with torch.no_grad():
            for q, k in zip(student.parameters(), teacher.parameters(), strict=True):
                k.data.mul_(m).add_(q.detach().data * (1 - m))
        return loss.detach()

    return step, shims


def deit_teacher(root: bench.BenchRoot) -> nn.Module:
    """DeiT's teacher as their main.py builds it (timm's, average pooling, eval mode), randomly
    initialised: its weights do not change the cost."""
    cfg = root.method
    return timm.create_model(cfg.teacher, num_classes=cfg.num_classes, global_pool="avg").eval()


def deit_teacher_flops(root: bench.BenchRoot) -> int:
    """The teacher's forward FLOPs on one image, counted as bench.method_flops counts ours, on
    the meta device (no memory, no compute: the step builds its own teacher)."""
    if root.method.distillation == "none":
        return 0
    size = root.method.teacher_img_size or root.model.img_size
    with torch.device("meta"):
        teacher = deit_teacher(root)
    return flops.counted_forward_flops(teacher, (1, 3, size, size))


def official_deit_step(
    folder: Path, root: bench.BenchRoot, dev: torch.device, precision: str
) -> tuple[Callable[[int], Tensor], list[str]]:
    """DeiT's step as its engine.py's train_one_epoch runs it, one process: timm's Mixup / CutMix
    on the batch, their model (models.py's DistilledVisionTransformer, or timm's ViT their
    undistilled entrypoints build) and their DistillationLoss (losses.py: the teacher's forward
    inside) under autocast, their finite-loss check, zero_grad, timm's NativeScaler (backward,
    clipping at train.clip_grad, the step) over timm's create_optimizer (AdamW, weight-decay
    groups, as their main.py), the EMA of the model (timm's ModelEma, as theirs). Their lr
    changes once an epoch: no per-step cost."""
    cfg, shape = root.method, encoder_shape(root)  # from timm's names, before their code
    models, losses = import_official(folder, ("models", "losses"))  # re-registers deit_* names
    shims: list[str] = []
    distilled = cfg.distillation != "none"
    net = models.DistilledVisionTransformer if distilled else timm.models.VisionTransformer
    model = net(  # their deit_*_patch16_224 entrypoints' arguments, called as create_model does
        **shape,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=cfg.num_classes,
        drop_rate=0.0,
        drop_path_rate=root.model.drop_path,
    ).to(dev)
    model.train()
    mixup = Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=1.0,
        switch_prob=cfg.mixup_switch_prob,
        mode="batch",
        label_smoothing=cfg.label_smoothing,
        num_classes=cfg.num_classes,
    )
    soft_targets = cfg.mixup > 0 or cfg.cutmix > 0
    base = SoftTargetCrossEntropy() if soft_targets else None
    base = base or LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    teacher = deit_teacher(root).to(dev) if distilled else None
    criterion = losses.DistillationLoss(base, teacher, cfg.distillation, cfg.alpha, cfg.tau)
    ema = ModelEma(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    weight_decay = bench.run_config(root).train.weight_decay
    args = SimpleNamespace(opt="adamw", lr=bench.LR, weight_decay=weight_decay, momentum=0.9)
    optimizer = create_optimizer(args, model)
    scaler = NativeScaler()
    scaler._scaler = torch.amp.GradScaler(dev.type, enabled=False)
    shims.append("timm's NativeScaler's fp16 GradScaler disabled (bf16 / fp32: no loss scaling)")
    batch = bench.synthetic_batch(root, dev, 3)
    images, labels = batch["images"], batch["labels"]
    clip = root.train.clip_grad or None

    def step(i: int) -> Tensor:
        samples, targets = mixup(images, labels) if soft_targets else (images, labels)
        with autocast(dev, precision):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the official DeiT step's loss is {loss.item()}")
        optimizer.zero_grad()
        scaler(loss, optimizer, clip_grad=clip, parameters=model.parameters())
        bench.synchronize(dev)
        if ema is not None:
            ema.update(model)
        return loss.detach()

    return step, shims


# ---------------------------------------------------------------------------------------------
# The 2-process resume round trip: the trainer itself, one process a rank.


def resume_config(out: str, smoke: bool, steps: int, **train: Any) -> Config:
    """MAE on synthetic data, 4 steps an epoch over 2 processes, a checkpoint every `steps`:
    ViT-S/16 at 224 px, 64 images a process, 2 loader workers (smoke: the tiny encoder on 32 px,
    4 images, loaded in the process)."""
    if smoke:
        model = ModelConfig(**TINY_MODEL)
        method = MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2)
        data, batch = DataConfig(synthetic_size=32, num_workers=0), 4
    else:
        model, method = ModelConfig(name="vit_small_patch16_224"), MAEConfig()
        data, batch = DataConfig(synthetic_size=512, num_workers=2), 64
    t = TrainConfig(
        output_dir=out, epochs=4, warmup_epochs=1, batch_size=batch, log_every=1,
        log_with="none", save_every_epochs=0, save_every_steps=steps, keep_last=4, **train,
    )  # fmt: skip
    return Config(model=model, data=data, train=t, method=method)


def train_rank(out: str, smoke: bool, steps: int, train: dict[str, Any]) -> dict[str, Any]:
    """One rank of a training run (its rank in the environment, as torchrun sets it)."""
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # the ranks share the CPU
    return fit(resume_config(out, smoke, steps, **train))


def logged_losses(run_dir: Path) -> dict[int, float]:
    rows = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def compare_runs(straight: str, resumed: str, steps: int, smoke: bool) -> dict[str, Any]:
    """The straight run of 2 x `steps` against the one resumed at `steps`: the final parameters
    and the losses of the steps after the resume, bit for bit."""
    final = f"checkpoints/step_{2 * steps:07d}/model.safetensors"
    a, b = load_file(str(Path(straight) / final)), load_file(str(Path(resumed) / final))
    diff = max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)
    before, after = logged_losses(Path(straight)), logged_losses(Path(resumed))
    after_resume = range(steps + 1, 2 * steps + 1)
    losses = [before.get(s) for s in after_resume], [after.get(s) for s in after_resume]
    cfg = resume_config("", smoke, steps)
    return {
        "model": cfg.model.name,
        "batch_size_per_process": cfg.train.batch_size,
        "num_workers": cfg.data.num_workers,
        "steps": 2 * steps,
        "resumed_from_step": steps,
        "params_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "max_abs_param_diff": diff,
        "losses_straight": losses[0],
        "losses_resumed": losses[1],
        "losses_equal": losses[0] == losses[1],
        "resumed_logged_from_step": min(after, default=None),
    }
