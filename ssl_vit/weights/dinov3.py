"""Official DINOv3 files (`dinov3_vit{s,s+,b,l,h+}16_pretrain_*.pth`: a `DinoVisionTransformer`
state dict; a training checkpoint's `teacher`, under `backbone.`), converted to timm's DINOv3 model
(`vit_*_patch16_dinov3[_qkvb]`: an Eva with RoPE and register tokens).

The official layout, from the released files' keys (timm's eva.checkpoint_filter_fn reads the same):
`cls_token` (1, 1, D), `storage_tokens` (1, R, D), `mask_token` (1, D), `patch_embed.proj.*`,
`rope_embed.periods` (D / heads / 4,), `blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
mlp.fc1, mlp.fc2 | mlp.w1, mlp.w2, mlp.w3, ls2.gamma}.*`, `attn.qkv.bias_mask` (3D,) where the key
bias is masked to zero (mask_k_bias), `norm.*`, and the training-only `local_cls_norm.*`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor

from ssl_vit.weights.family import Family
from ssl_vit.weights.io import CheckpointError

HEADS = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}
"""Width -> attention heads of the official configs (S and S+, B, L, H+, 7B); other widths: 64
channels a head, as all but 7B."""
SIZES = {384: "small", 768: "base", 1024: "large", 1280: "huge_plus", 4096: "7b"}
"""Width -> timm's DINOv3 size name (vit_{size}_patch16_dinov3; S+ is small_plus: SwiGLU at 384)."""
RENAMES = (
    (re.compile(r"^storage_tokens$"), "reg_token"),
    (re.compile(r"^rope_embed\.periods$"), "rope.periods"),
    (re.compile(r"\.ls1\.gamma$"), ".gamma_1"),
    (re.compile(r"\.ls2\.gamma$"), ".gamma_2"),
    (re.compile(r"\.mlp\.w1\."), ".mlp.fc1_g."),
    (re.compile(r"\.mlp\.w2\."), ".mlp.fc1_x."),
    (re.compile(r"\.mlp\.w3\."), ".mlp.fc2."),
)
"""Official -> timm names. SwiGLU: w1 is the gated (SiLU) branch, w2 the linear one, w3 the
output: timm's SwiGLU fc1_g, fc1_x, fc2. `rope.periods` is checked against the model, not loaded
(timm computes it: load.check_buffers)."""
UNSUPPORTED = re.compile(r"^cls_norm\.")
"""Untied cls / patch norms (untie_cls_and_patch_norms): timm's Eva has one final norm."""


def official_dinov3(state: dict[str, Tensor]) -> bool:
    """Whether an unwrapped state dict is in the official DINOv3 layout: storage tokens, or the
    RoPE periods buffer (a model without registers)."""
    return "storage_tokens" in state or "rope_embed.periods" in state


def dinov3_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official DINOv3 backbone in timm's Eva names (`RENAMES`). The packed qkv bias (3D,) is
    split into timm's `q_bias` and `v_bias`: the key bias must be zero in effect (masked by
    `bias_mask`, as mask_k_bias, or stored as zeros), since timm's key bias is a fixed zero; a
    bias that is all zero (the distilled releases) is dropped: the model is then built without
    one. `local_cls_norm` (training only, local crops) is dropped. A file without layer scale
    (layerscale_init None: no block has any) gets gammas of 1, the same function: timm builds
    its DINOv3 models with layer scale always (create_model drops init_values=None)."""
    if bad := next((k for k in state if UNSUPPORTED.match(k)), None):
        raise CheckpointError(
            f"{bad}: untied cls and patch norms (untie_cls_and_patch_norms) are not supported by "
            "timm's DINOv3 model"
        )
    out: dict[str, Tensor] = {}
    if "cls_token" in state and not any(k.endswith((".ls1.gamma", ".ls2.gamma")) for k in state):
        dim = state["cls_token"].shape[-1]
        blocks = {int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
        out |= {f"blocks.{i}.gamma_{j}": torch.ones(dim) for i in blocks for j in (1, 2)}
    for key, value in state.items():
        if key.startswith("local_cls_norm.") or key.endswith(".qkv.bias_mask"):
            continue
        if key.endswith(".attn.qkv.bias"):
            out |= _split_qkv_bias(key, value, state.get(f"{key}_mask"))
            continue
        for pattern, new in RENAMES:
            key = pattern.sub(new, key)
        out[key] = value
    return out


def _split_qkv_bias(key: str, bias: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
    """{} for an all-zero bias, else timm's `q_bias` and `v_bias` of the packed (3D,) bias."""
    if mask is not None:
        q_mask, k_mask, v_mask = mask.chunk(3)
        if not (q_mask.eq(1).all() and k_mask.eq(0).all() and v_mask.eq(1).all()):
            raise CheckpointError(
                f"{key}_mask: expected ones on the query and value thirds and zeros on the key "
                "third (mask_k_bias), got another mask"
            )
        bias = bias * mask
    q, k, v = bias.chunk(3)
    if bool(k.ne(0).any()):
        raise CheckpointError(
            f"{key}: a non-zero key bias (max |b| {k.abs().max().item():.3g}) without a "
            "bias_mask; timm's DINOv3 model fixes the key bias at zero"
        )
    if not (bool(q.ne(0).any()) or bool(v.ne(0).any())):
        return {}
    stem = key.removesuffix("qkv.bias")
    return {f"{stem}q_bias": q, f"{stem}v_bias": v}


def infer_dinov3(state: dict[str, Tensor], num_heads: int = 0) -> tuple[str, dict[str, Any]]:
    """(timm name, kwargs) of the DINOv3 model a converted state dict holds, from its shapes:
    width, depth, patch size and input channels; registers (`reg_token` (1, R, D)); heads
    (`num_heads`, else `HEADS`); q/v bias (`q_bias`: the `_qkvb` model); SwiGLU (`mlp.fc1_g`,
    its hidden width) or GELU MLP (`mlp.fc1`). Layer scale always (`dinov3_keys`)."""
    patch = state.get("patch_embed.proj.weight")
    blocks = {int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if patch is None or patch.ndim != 4 or "cls_token" not in state or not blocks:
        raise CheckpointError(
            "cannot infer a DINOv3 architecture: no cls_token, 4-d patch_embed.proj.weight and "
            "blocks.* keys"
        )
    dim, in_chans, p = patch.shape[0], patch.shape[1], patch.shape[-1]
    heads = num_heads or HEADS.get(dim, dim // 64)
    if not heads or dim % heads:
        raise CheckpointError(
            f"width {dim}: no official number of heads (64 channels a head): give it "
            "(--model.num_heads / --load.num_heads)"
        )
    biased = "blocks.0.attn.q_bias" in state
    swiglu = "blocks.0.mlp.fc1_g.weight" in state
    name = f"vit_{SIZES.get(dim, 'base')}_patch16_dinov3{'_qkvb' if biased else ''}"
    if dim == 384 and swiglu:
        name = name.replace("small", "small_plus")
    hidden = state["blocks.0.mlp.fc1_g.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    reg = state.get("reg_token")
    kwargs: dict[str, Any] = dict(
        patch_size=p,
        embed_dim=dim,
        depth=max(blocks) + 1,
        num_heads=heads,
        mlp_ratio=_ratio(hidden, dim),
        num_reg_tokens=0 if reg is None else reg.shape[1],
        swiglu_mlp=swiglu,
        swiglu_align_to=(8 if hidden % 8 == 0 else 1) if swiglu else 0,
    )
    if in_chans != 3:
        kwargs["in_chans"] = in_chans
    return name, kwargs


def _ratio(hidden: int, dim: int) -> float:
    """mlp_ratio with int(dim * ratio) == hidden (timm's hidden width), despite float error."""
    ratio = hidden / dim
    while int(dim * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


FAMILY = Family(
    "dinov3",
    dropped=r"^(dino_head|ibot_head)\.|^mask_token$",
    detect=official_dinov3,
    to_timm=dinov3_keys,
    infer=infer_dinov3,
)
"""The DINO and iBOT heads and the (1, D) mask token are method state. RoPE: nothing to resample
(no position embedding), so no formula (interp None)."""
