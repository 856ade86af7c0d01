"""Analytic FLOPs of a training step per image, and the device peaks that turn them into MFU.

Counted are the matmuls, at 2 FLOPs per multiply-add: patch embedding, qkv, attention scores and
weighted sum, projection, MLP, and the methods' linear layers (MAE decoder, DINO head, DeiT heads).
Norms, softmax, GELU, losses, masking and the optimizer are left out, as by
`torch.utils.flop_counter.FlopCounterMode` (they are elementwise: well under 1 % of a ViT step).

A training step counts 3 x the forward of the trained parts (the backward runs two matmuls per
forward one: input and weight gradients) + 1 x the forward of frozen parts (teachers). That is the
model-FLOPs convention of MFU (PaLM, arXiv 2204.02311, App. B): it counts no recomputation, where
FlopCounterMode counts flash attention's backward as 2.5 x its forward; and it gives the patch
embedding an input gradient it never computes (0.2 % of a ViT-B/16 step).

Written by hand rather than read off FlopCounterMode: it needs no model built or run, splits the
count by part, and keeps to the model-FLOPs convention. Tests check it against FlopCounterMode run
under `flop_counter()`, which routes attention through the math SDPA backend: which fused attention
kernels FlopCounterMode knows differs between torch versions (2.14 counts 0 for CPU SDPA), the plain
matmuls of the math backend are counted by every version.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

FULL_TOKEN_CLASSES = 1000
"""Classes of the full-token baseline's linear head (ImageNet-1k)."""

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets: H100 (SXM5 / PCIe / NVL), H200
# (SXM / NVL) and GH200 "Tensor Core GPU" datasheets, A100 datasheet (SXM and PCIe alike). bf16 is
# the tensor-core peak; fp32 the plain FP32 (non-tensor-core) peak, as torch runs fp32 matmuls by
# default (no TF32 unless torch.backends.cuda.matmul allows it). First matching name wins.
PEAK_TFLOPS: tuple[tuple[str, str, float, float], ...] = (
    # (substring of torch.cuda.get_device_name, label, bf16 dense, fp32)
    ("H100 PCIe", "H100 PCIe", 756.0, 51.0),
    ("H100 NVL", "H100 NVL", 835.0, 60.0),
    ("H100", "H100 SXM", 989.0, 67.0),
    ("GH200", "GH200", 989.0, 67.0),
    ("H200 NVL", "H200 NVL", 835.0, 60.0),
    ("H200", "H200 SXM", 989.0, 67.0),
    ("A100", "A100", 312.0, 19.5),
)


def device_peak_tflops(device_name: str, precision: str) -> tuple[float, str] | None:
    """(dense peak TFLOP/s, label) of a known GPU at 'bf16' or 'fp32'; None for anything else
    (every CPU: its peak depends on cores, clocks and vector units we do not guess)."""
    for key, label, bf16, fp32 in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            peak = {"bf16": bf16, "fp32": fp32}.get(precision)
            return None if peak is None else (peak, f"{label} {precision} dense")
    return None


def achieved_tflops(flops_per_img: float, img_per_s: float) -> float:
    """Achieved TFLOP/s: training FLOPs per image x images per second / 1e12."""
    return flops_per_img * img_per_s / 1e12


def mfu(flops_per_img: float, img_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved / peak FLOP/s; None without a peak."""
    if not peak_tflops:
        return None
    return achieved_tflops(flops_per_img, img_per_s) / peak_tflops


# ---------------------------------------------------------------------------------------------
# Analytic counts. All per image (one sample and all its crops); every count is linear in batch
# but DINOv2's, whose padded masked rows are a step function of it.


@dataclass(frozen=True)
class ViTDims:
    """What a ViT's FLOPs depend on (not the head count: attention costs 4 T^2 D over all heads)."""

    embed_dim: int
    depth: int
    mlp_hidden: int
    patch_size: int
    in_chans: int = 3
    num_prefix: int = 1
    """The model's own prefix tokens: cls + registers."""

    @classmethod
    def of(cls, vit: nn.Module) -> ViTDims:
        """From a `Backbone` or timm `VisionTransformer` with standard (qkv, fc1, fc2) blocks."""
        block = vit.blocks[0]
        qkv = getattr(block.attn, "qkv", None)
        fc1, fc2 = getattr(block.mlp, "fc1", None), getattr(block.mlp, "fc2", None)
        d = vit.embed_dim
        if (  # a SwiGLU MLP (fc1_g, fc1_x) or separate q / k / v projections: not counted
            qkv is None
            or fc1 is None
            or fc2 is None
            or qkv.out_features != 3 * d
            or fc2.in_features != fc1.out_features
        ):
            raise ValueError("not a standard ViT block (fused qkv, fc1 -> fc2 MLP)")
        ph, pw = vit.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"only square patches are counted, got {ph}x{pw}")
        in_chans = vit.patch_embed.proj.in_channels
        return cls(d, len(vit.blocks), fc1.out_features, ph, in_chans, vit.num_prefix_tokens)


def vit_dims(name: str, **timm_kwargs: Any) -> ViTDims:
    """The dims of timm's ViT `name` built with `timm_kwargs` (a ModelConfig's `timm_kwargs()`),
    built on the meta device (no memory, ~0.2 s)."""
    with torch.device("meta"):
        return ViTDims.of(timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs))


def linear(tokens: int, d_in: int, d_out: int) -> int:
    """(tokens, d_in) @ (d_in, d_out): 2 FLOPs per multiply-add."""
    return 2 * tokens * d_in * d_out


def block_forward(tokens: int, dim: int, mlp_hidden: int) -> int:
    """One pre-norm transformer block on `tokens` tokens of width `dim`."""
    qkv = linear(tokens, dim, 3 * dim)
    attention = 2 * (2 * tokens * tokens * dim)  # q k^T and (weights) v, summed over heads
    proj = linear(tokens, dim, dim)
    mlp = linear(tokens, dim, mlp_hidden) + linear(tokens, mlp_hidden, dim)
    return qkv + attention + proj + mlp


def patch_embed_forward(d: ViTDims, img_size: int) -> int:
    """The patch-embedding convolution: a linear (C p^2 -> D) on every patch of the image."""
    return linear((img_size // d.patch_size) ** 2, d.in_chans * d.patch_size**2, d.embed_dim)


def vit_forward(d: ViTDims, img_size: int, *, keep: int | None = None) -> int:
    """Encoder on one `img_size` image: patch embedding of all patches, then the blocks on the
    prefix tokens and `keep` patch tokens (None = all; MAE masks after the embedding)."""
    patches = (img_size // d.patch_size) ** 2
    tokens = d.num_prefix + (patches if keep is None else keep)
    return patch_embed_forward(d, img_size) + d.depth * block_forward(
        tokens, d.embed_dim, d.mlp_hidden
    )


@dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs per image of one training step, split by whether the part is trained."""

    trained: float
    """Forward of the parts that get gradients (counted 3 x in the step)."""
    frozen: float = 0
    """Forward-only parts: a teacher (counted 1 x)."""

    @property
    def forward(self) -> float:
        return self.trained + self.frozen

    @property
    def train(self) -> float:
        """Training-step FLOPs per image: forward + backward (2 x) of the trained parts, plus the
        frozen forward."""
        return 3 * self.trained + self.frozen


def mae_flops(d: ViTDims, img_size: int, cfg: Any) -> StepFlops:
    """MAE (cfg: MAEConfig): encoder on cls + the kept K = int(L (1 - mask_ratio)) patches; the
    decoder embed on those 1 + K; decoder blocks, norm and pixel head on cls + all L patches (the
    head's cls row is computed, then dropped)."""
    patches = (img_size // d.patch_size) ** 2
    keep = int(patches * (1 - cfg.mask_ratio))  # as ssl_vit.ops.random_masking
    dec, t_dec = cfg.decoder_dim, d.num_prefix + patches
    encoder = vit_forward(d, img_size, keep=keep)
    decoder = (
        linear(d.num_prefix + keep, d.embed_dim, dec)
        + cfg.decoder_depth * block_forward(t_dec, dec, int(dec * cfg.decoder_mlp_ratio))
        + linear(t_dec, dec, d.patch_size**2 * d.in_chans)
    )
    return StepFlops(encoder + decoder)


def dino_head_forward(in_dim: int, cfg: Any) -> int:
    """DINO head on one crop's cls token: 3-layer MLP to the bottleneck, then the last layer."""
    h, b = cfg.hidden_dim, cfg.bottleneck_dim
    return linear(1, in_dim, h) + linear(1, h, h) + linear(1, h, b) + linear(1, b, cfg.out_dim)


def dino_flops(d: ViTDims, img_size: int, cfg: Any) -> StepFlops:
    """DINO (cfg: DINOConfig): the student (backbone + head) on 2 globals at img_size and the
    local crops at local_crop_size; the EMA teacher's forward on the 2 globals only."""
    head = dino_head_forward(d.embed_dim, cfg)
    globals_ = 2 * (vit_forward(d, img_size) + head)
    locals_ = cfg.local_crops * (vit_forward(d, cfg.local_crop_size) + head)
    return StepFlops(trained=globals_ + locals_, frozen=globals_)


def dinov2_flops(d: ViTDims, img_size: int, cfg: Any, batch_size: int) -> StepFlops:
    """DINOv2 (cfg: DINOv2Config) at `batch_size` images a step (per process): the student on 2
    globals at img_size (every patch: a masked one runs as the mask token) and the local crops;
    the EMA teacher's forward on the 2 globals; the DINO head on the cls token of every student
    crop and of the teacher's 2 globals; the patch head (the DINO head, or the separate iBOT
    head) of student and teacher on the masked-patch rows padded to
    `cfg.masked_rows(2 x batch_size, ...)`: what runs whatever the draw masks (padded rows run,
    then weigh 0), hence batch_size is needed and the count per image is a fraction. KoLeo's
    (B, D) @ (D, B) nearest-neighbour matmul per global crop (4 B D per image) is left out:
    under 1e-5 of a ViT step."""
    patches = (img_size // d.patch_size) ** 2
    rows = cfg.masked_rows(2 * batch_size, patches) / batch_size
    patch_head = dino_head_forward(
        d.embed_dim, cfg.head("ibot" if cfg.ibot_separate_head else "dino")
    )
    cls_head = dino_head_forward(d.embed_dim, cfg)
    globals_ = 2 * (vit_forward(d, img_size) + cls_head) + rows * patch_head
    locals_ = cfg.local_crops * (vit_forward(d, cfg.local_crop_size) + cls_head)
    return StepFlops(trained=globals_ + locals_, frozen=globals_)


def deit_flops(d: ViTDims, img_size: int, cfg: Any, teacher_forward: int = 0) -> StepFlops:
    """DeiT (cfg: DeiTConfig): the student on all patches and its head(s); `d` are the dims of
    the student's backbone as built, whose prefix holds the distillation token when distilling
    (a timm `deit_*_distilled`); `teacher_forward` = the frozen teacher's forward FLOPs per image
    (not analytic: a CNN; see `counted_forward_flops`)."""
    distilled = cfg.distillation != "none"
    student = vit_forward(d, img_size)
    heads = (1 + distilled) * linear(1, d.embed_dim, cfg.num_classes)
    return StepFlops(student + heads, teacher_forward if distilled else 0)


def probe_flops(d: ViTDims, img_size: int, head_in: int, classes: int) -> StepFlops:
    """A linear segmentation probe (`ssl-vit segprobe`): the frozen encoder's forward on all
    patches, and the trained 1x1 conv from `head_in` features to `classes` on every patch (its
    BatchNorm and the bilinear upsampling are elementwise: uncounted, as norms everywhere). The
    head's backward is counted 2 x, an upper bound: the frozen features need no gradient (1 x);
    the head is a small share of the step either way."""
    patches = (img_size // d.patch_size) ** 2
    return StepFlops(trained=linear(patches, head_in, classes), frozen=vit_forward(d, img_size))


def full_token_flops(d: ViTDims, img_size: int, num_classes: int = FULL_TOKEN_CLASSES) -> StepFlops:
    """Supervised ViT baseline: encoder on all tokens + a linear head on the pooled token."""
    return StepFlops(vit_forward(d, img_size) + linear(1, d.embed_dim, num_classes))


def segfinetune_flops(d: ViTDims, img_size: int, cfg: Any) -> StepFlops:
    """`ssl-vit segfinetune` (cfg: SegFineTuneConfig), backbone and head trained. Linear head:
    the encoder on all patches, a 1x1 conv to the classes on each. EoMT: the encoder, whose last
    num_blocks blocks also carry the num_queries queries; a prediction before each of those
    blocks (while training, with masked attention) and after the last: the mask MLP (3 linears)
    and class head on the queries, the upscaler on the patch grid (per x2 step: a 2x2 stride-2
    transposed conv, a depthwise 3x3 conv; EoMT's log2(patch) - 2 steps, at least 1) and each
    query's mask as its dot product with every upscaled feature. The masked attention costs what
    full attention does (the mask is applied to the full q k^T)."""
    patches, e = (img_size // d.patch_size) ** 2, d.embed_dim
    if cfg.head == "linear":
        return StepFlops(vit_forward(d, img_size) + linear(patches, e, cfg.num_classes))
    q, blocks, tokens = cfg.num_queries, cfg.num_blocks, d.num_prefix + patches
    encoder = (
        patch_embed_forward(d, img_size)
        + (d.depth - blocks) * block_forward(tokens, e, d.mlp_hidden)
        + blocks * block_forward(tokens + q, e, d.mlp_hidden)
    )
    steps = max(1, int(math.log2(d.patch_size)) - 2)
    grids = [patches * 4**j for j in range(steps)]  # each step's input pixels
    upscale = sum(linear(n, e, 4 * e) + 2 * 9 * e * 4 * n for n in grids)
    heads = 3 * linear(q, e, e) + linear(q, e, cfg.num_classes + 1)
    prediction = heads + upscale + linear(q, e, patches * 4**steps)
    return StepFlops(encoder + (blocks + 1 if cfg.masked_attn else 1) * prediction)


METHOD_FLOPS = {
    "mae": mae_flops,
    "dino": dino_flops,
    "dinov2": dinov2_flops,
    "deit": deit_flops,
    "segfinetune": segfinetune_flops,
}
"""Method name -> its analytic count; the other evaluators have none (segprobe: probe_flops)."""


def step_flops(
    d: ViTDims, img_size: int, method_cfg: Any, teacher_forward: int = 0, batch_size: int = 1
) -> StepFlops | None:
    """The method's step FLOPs for a backbone of dims `d` at `img_size`; None if uncounted.
    `teacher_forward`: DeiT's teacher (see deit_flops); `batch_size`: DINOv2's padded rows."""
    count = METHOD_FLOPS.get(method_cfg.name)
    if count is None:
        return None
    extra = {
        "deit": {"teacher_forward": teacher_forward},
        "dinov2": {"batch_size": batch_size},
    }.get(method_cfg.name, {})
    return count(d, img_size, method_cfg, **extra)


@contextmanager
def flop_counter() -> Iterator[FlopCounterMode]:
    """FlopCounterMode with attention on the math SDPA backend, whose q k^T and weights @ v are
    plain batched matmuls that every torch version counts (fused kernels are counted by some
    versions only; their backward may also recompute q k^T, which model FLOPs leave out)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield counter


def counted_forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of `model(x)` for x of `input_shape`, by `flop_counter()` (convolutions, matmuls,
    attention): for a part with no analytic count here, e.g. a CNN or ViT teacher. Build the model
    on the meta device to count without memory or compute."""
    device = next(model.parameters()).device
    x = torch.zeros(input_shape, device=device)
    with torch.no_grad(), flop_counter() as counter:
        model(x)
    return counter.get_total_flops()
