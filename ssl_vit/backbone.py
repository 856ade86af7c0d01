"""The ViT backbone: an adapter over timm's VisionTransformer; the only file touching its internals.

It owns timm's submodules and parameters under timm's own names (so its state dict is a timm state
dict) and adds what pretext methods need from an encoder: running on a subset of patch tokens,
replacing chosen patch tokens by a given token, extra prefix tokens, any input resolution (with
the position-embedding resampling formula the caller picks, `resample_pos_embed`), the last n
blocks' outputs, and the last block's attention.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

PosInterp = Literal["antialias", "bicubic", "offset"]
"""How a position embedding is resized to another patch grid (`resample_pos_embed`)."""


def resample_pos_embed(
    pos: Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix: int,
    mode: PosInterp = "antialias",
) -> Tensor:
    """(1, P + h0*w0, D) -> (1, P + h*w, D): the patch positions resized on their 2-D grid
    (h0, w0) -> (h, w), bicubic, the P prefix positions unchanged; the same tensor when the grids
    are equal. The three formulas the pretraining codebases use differ by up to ~0.06 on a
    trained ViT-S/16 embedding (docs/fidelity.md), so the caller picks its own:

    antialias: timm's resample_abs_pos_embed (antialiased bicubic, PIL's kernel), what timm's
      dynamic-size ViT and checkpoint_filter_fn do.
    bicubic: F.interpolate(size=(h, w), mode="bicubic", align_corners=False), no antialiasing:
      the checkpoint-resize formula of the masked-autoencoder and data-efficient-transformer code
      (util/pos_embed.py interpolate_pos_embed; main.py).
    offset: F.interpolate(scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic"), no
      antialiasing: the self-distillation code's interpolate_pos_encoding, which samples at that
      scale (the 0.1 guards the output size against float error).
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos
    if mode == "antialias":
        return resample_abs_pos_embed(pos, new_grid, old_grid, num_prefix_tokens=num_prefix)
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:].float()
    grid = rearrange(grid, "1 (h w) d -> 1 d h w", h=old_grid[0], w=old_grid[1])
    if mode == "bicubic":
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    elif mode == "offset":
        scale = tuple((n + 0.1) / o for n, o in zip(new_grid, old_grid, strict=True))
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    else:
        raise ValueError(f"position-embedding interpolation: unknown mode {mode!r}")
    if tuple(grid.shape[-2:]) != tuple(new_grid):
        raise ValueError(f"resampled to {tuple(grid.shape[-2:])}, not {tuple(new_grid)}")
    return torch.cat([prefix, rearrange(grid, "1 d h w -> 1 (h w) d").to(pos.dtype)], dim=1)


@dataclass
class BackboneOutput:
    tokens: Tensor
    """(B, T, D) after the final norm; T = num_prefix + number of patch tokens run."""
    num_prefix: int
    """Prefix tokens at the front of `tokens`: the model's own (cls, registers) + the extra ones."""
    layers: list[Tensor] = field(default_factory=list)
    """The last n_last blocks' outputs, each through the final norm, oldest first."""
    attn: Tensor | None = None
    """(B, heads, T, T) attention probabilities of the last block, when asked."""


class Backbone(nn.Module):
    """A timm ViT whose `state_dict()` is that of `timm.create_model(name, num_classes=0, **kw)`.

    pos_interp: how `forward` resizes the position embedding for an input whose patch grid is not
    the stored one (`resample_pos_embed`); a runtime choice of the caller, not part of the
    weights or of backbone.json."""

    def __init__(self, name: str, *, pos_interp: PosInterp = "antialias", **timm_kwargs: Any):
        super().__init__()
        try:
            json.dumps(timm_kwargs)
        except TypeError as e:
            raise ValueError(
                f"timm_kwargs must be JSON-serialisable (saved to backbone.json): {e}"
            ) from e
        self.name = name
        self.timm_kwargs = dict(timm_kwargs)
        model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
        # Adopt timm's parameters and submodules under their own names; absent tokens stay None.
        for attr in ("cls_token", "dist_token", "reg_token", "pos_embed"):
            setattr(self, attr, getattr(model, attr, None))
        for attr, param in model.named_parameters(recurse=False):
            setattr(self, attr, param)
        for attr, child in model.named_children():
            setattr(self, attr, child)
        self.patch_embed.strict_img_size = False  # any resolution that is a multiple of the patch
        self.no_embed_class: bool = model.no_embed_class
        self.num_prefix_tokens: int = model.num_prefix_tokens
        self.embed_dim: int = model.embed_dim
        self.in_chans: int = self.patch_embed.proj.in_channels
        self.num_heads: int = self.blocks[0].attn.num_heads
        self.depth: int = len(self.blocks)
        ph, pw = self.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"only square patches are supported, got {ph}x{pw}")
        self.patch_size: int = ph
        self.pos_interp: PosInterp = pos_interp
        self.grad_checkpointing = False
        """Recompute each block in the backward pass instead of storing its activations."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (timm's method name): while gradients are
        recorded, each block keeps only its input and is re-run (same RNG: drop path and dropout
        draw the same) in the backward pass. Gradients are unchanged; memory drops to one block's
        activations plus the block inputs, for about one more forward pass of compute."""
        self.grad_checkpointing = enable

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) patch grid at the configured image size (the grid `pos_embed` is stored for)."""
        return tuple(self.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def forward(
        self,
        images: Tensor,
        *,
        ids_keep: Tensor | None = None,
        mask: Tensor | None = None,
        mask_token: Tensor | None = None,
        prefix: Tensor | None = None,
        n_last: int = 0,
        return_attn: bool = False,
    ) -> BackboneOutput:
        """Encode images (B, C, H, W); H and W multiples of the patch size.

        ids_keep (B, K) long: run only these patch tokens (row-major positions on the h x w grid),
        in this order. mask (B, L) bool with mask_token (D,) or (1, D): the masked patches'
        embeddings are replaced by mask_token before the position embedding is added (masked
        image modelling: the token is the caller's). prefix (B, P, D): extra tokens, position
        embedding already added, placed right after the model's own prefix tokens. With none of
        these, this is timm's `forward_features`.
        """
        x = self.patch_embed(images)  # (B, L, D); (B, h, w, D) if built with dynamic_img_size
        x = x.flatten(1, -2)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype).view(1, 1, -1), x)
        n_own = self.num_prefix_tokens
        tokens = (self.cls_token, self.dist_token, self.reg_token)  # timm's order
        own = [t.expand(x.shape[0], -1, -1) for t in tokens if t is not None]
        if self.pos_embed is not None:
            n_pos_prefix = 0 if self.no_embed_class else n_own
            grid = self.patch_embed.dynamic_feat_size(images.shape[-2:])
            pos = resample_pos_embed(
                self.pos_embed, grid, self.grid_size, n_pos_prefix, self.pos_interp
            )
            x = x + pos[:, n_pos_prefix:]
            if n_pos_prefix:
                own = [torch.cat(own, dim=1) + pos[:, :n_pos_prefix]]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        extra = [] if prefix is None else [prefix]
        x = torch.cat([*own, *extra, x], dim=1)
        num_prefix = n_own + (0 if prefix is None else prefix.shape[1])
        x = self.norm_pre(self.patch_drop(self.pos_drop(x)))

        layers, attn = [], []
        for i, block in enumerate(self.blocks):
            # read inside the block's call, where a sharding wrapper (FSDP) has gathered its weights
            hook = (
                block.register_forward_pre_hook(lambda b, a: attn.append(attention_probs(b, a[0])))
                if return_attn and i == self.depth - 1
                else None
            )
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if hook is not None:
                hook.remove()
            if i >= self.depth - n_last:
                layers.append(self.norm(x))
        x = layers[-1] if n_last > 0 else self.norm(x)
        return BackboneOutput(x, num_prefix, layers, attn[0] if attn else None)

    def to_timm(self) -> nn.Module:
        """A timm VisionTransformer (num_classes=0) holding a copy of these weights."""
        model = timm.create_model(self.name, pretrained=False, num_classes=0, **self.timm_kwargs)
        model.load_state_dict(self.state_dict())
        return model.to(next(self.parameters()).device)

    def config_dict(self) -> dict[str, Any]:
        """What rebuilds this backbone: `Backbone(d["name"], **d["kwargs"])` (backbone.json)."""
        return {"name": self.name, "kwargs": dict(self.timm_kwargs)}

    def no_weight_decay(self) -> set[str]:
        """timm's: the position embedding and the tokens (by timm's rule, not every method's)."""
        names = ("pos_embed", "cls_token", "dist_token", "reg_token")
        return {n for n in names if getattr(self, n) is not None}


def cls_of_crops(backbone: Backbone, crops: list[Tensor]) -> Tensor:
    """[(B, C, h_i, w_i)] -> (len(crops) * B, D) cls tokens, crop-major, for multi-crop methods.
    Consecutive crops of one resolution run as one batch (the globals together, the locals)."""
    feats = [
        backbone(torch.cat(list(group))).tokens[:, 0]
        for _, group in itertools.groupby(crops, key=lambda c: c.shape[-2:])
    ]
    return torch.cat(feats)


def attention_probs(block: nn.Module, x: Tensor) -> Tensor:
    """(B, heads, T, T) softmax attention of a timm `Block` on its input x (B, T, D).

    Recomputed eagerly because fused SDPA attention never materialises the probabilities.
    """
    attn = block.attn
    qkv = rearrange(attn.qkv(block.norm1(x)), "b t (k h d) -> k b h t d", k=3, h=attn.num_heads)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
