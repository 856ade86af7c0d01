"""The ViT backbone: an adapter over timm's VisionTransformer; the only file touching its internals.

It owns timm's submodules and parameters under timm's own names (so its state dict is a timm state
dict) and adds what pretext methods need from an encoder: running on a subset of patch tokens, extra
prefix tokens, any input resolution, the last n blocks' outputs, and the last block's attention.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from einops import rearrange
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


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
    """A timm ViT whose `state_dict()` is that of `timm.create_model(name, num_classes=0, **kw)`."""

    def __init__(self, name: str, **timm_kwargs: Any):
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
        for attr in ("cls_token", "reg_token", "pos_embed"):
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
        prefix: Tensor | None = None,
        n_last: int = 0,
        return_attn: bool = False,
    ) -> BackboneOutput:
        """Encode images (B, C, H, W); H and W multiples of the patch size.

        ids_keep (B, K) long: run only these patch tokens (row-major positions on the h x w grid),
        in this order. prefix (B, P, D): extra tokens, position embedding already added, placed
        right after the model's own prefix tokens. With neither, this is timm's `forward_features`.
        """
        x = self.patch_embed(images)  # (B, L, D); (B, h, w, D) if built with dynamic_img_size
        x = x.flatten(1, -2)
        n_own = self.num_prefix_tokens
        own = [
            t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None
        ]
        if self.pos_embed is not None:
            n_pos_prefix = 0 if self.no_embed_class else n_own
            pos = resample_abs_pos_embed(
                self.pos_embed,
                new_size=self.patch_embed.dynamic_feat_size(images.shape[-2:]),
                old_size=self.grid_size,
                num_prefix_tokens=n_pos_prefix,
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
        """Parameter names that get no weight decay: the position embedding and the tokens."""
        return {n for n in ("pos_embed", "cls_token", "reg_token") if getattr(self, n) is not None}


def attention_probs(block: nn.Module, x: Tensor) -> Tensor:
    """(B, heads, T, T) softmax attention of a timm `Block` on its input x (B, T, D).

    Recomputed eagerly because fused SDPA attention never materialises the probabilities.
    """
    attn = block.attn
    qkv = rearrange(attn.qkv(block.norm1(x)), "b t (k h d) -> k b h t d", k=3, h=attn.num_heads)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
