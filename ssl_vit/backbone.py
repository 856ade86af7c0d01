"""The ViT backbone: one adapter over timm's ViT families, the only file touching their internals:
`VisionTransformer` (absolute position embedding) and timm's RoPE `Eva` (rotary embedding of each
input's grid passed to every block; registers, layer scale, q/v bias, SwiGLU).

It owns timm's submodules and parameters under timm's own names (so its state dict is a timm state
dict) and adds what pretext methods need from an encoder: running on a subset of patch tokens,
replacing chosen patch tokens by a given token, extra prefix tokens, any input resolution (with
the position-embedding resampling formula the caller picks, `resample_pos_embed`; a rotary
embedding is computed for the grid: nothing to resample), the last n blocks' outputs, and the last
block's attention. What differs between the families is one small `Positions` object per model
class (`POSITIONS`): the patch dropout and the blocks' keyword arguments (the rotary rows).
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
from timm.layers.patch_dropout import patch_dropout_forward
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import VisionTransformer
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


@dataclass
class BlockInput:
    """The token sequence a block runs on (`Backbone.embed`, `add_prefix`): what the blocks need
    besides the tokens themselves, for a caller that runs them one by one (`run_block`)."""

    x: Tensor
    """(B, T, D) the tokens entering block 0."""
    num_prefix: int
    """Prefix tokens at the front: the model's own (cls, registers) + the extra ones."""
    grid: tuple[int, int]
    """(h, w) patch grid of the input."""
    ids_keep: Tensor | None = None
    dropped: Tensor | None = None
    """The kept patches' indices of `forward`'s ids_keep and of patch dropout (or None)."""
    kw: dict[str, Tensor] = field(default_factory=dict)
    """The blocks' keyword arguments for these tokens: a rotary model's rows."""


class AbsolutePositions:
    """timm's VisionTransformer: its position table is added before the blocks (`Backbone.forward`,
    resampled to the input's grid); its patch dropout (PatchDropout or Identity) runs on the whole
    sequence; its blocks take the tokens alone."""

    def __init__(self, model: nn.Module):
        del model  # nothing to check: the Backbone was written for it

    def drop_patches(
        self, backbone: Backbone, x: Tensor, num_prefix: int
    ) -> tuple[Tensor, Tensor | None]:
        """(tokens, None): the kept patches' indices are not needed."""
        return backbone.patch_drop(x), None

    def block_kwargs(
        self,
        backbone: Backbone,
        grid: tuple[int, int],
        ids_keep: Tensor | None,
        dropped: Tensor | None,
        num_extra: int,
    ) -> dict[str, Tensor]:
        return {}


class RotaryPositions:
    """timm's Eva with one 2-D rotary embedding (RoPE) for all blocks, computed for any grid
    (built with dynamic_img_size, as timm's `vit_*_patch16_*v3[_qkvb]` models): no position
    table (nothing to resample: the rotation angles are computed for each input's grid, on
    coordinates normalised to it), each block rotating q and k of the tokens past its attention's
    `num_prefix_tokens` (the model's own cls and registers) by `rope` rows, one per such token.

    The rows follow the tokens: gathered at the kept patches (`ids_keep`) and at patch dropout's
    kept indices; a method's extra prefix tokens, which the attention counts among the rotated
    ones, get identity rows (sin 0, cos 1: q and k unchanged, exactly). The grid's rows are
    computed once per grid and device (timm builds the coordinates on the CPU: a copy to the
    device, and a host sync, on every call otherwise), unless the embedding augments its
    coordinates in training (`aug_active`) or under torch.compile."""

    def __init__(self, model: nn.Module):
        rope = getattr(model, "rope", None)
        blocks = list(model.blocks)
        rows = None
        if rope is not None:  # in eval mode: no coordinate augmentation, no RNG drawn
            training = rope.training
            rows = rope.eval().get_embed(shape=[2, 3])
            rope.train(training)
        if (
            not isinstance(rows, Tensor)
            or rows.shape[0] != 6
            or getattr(model, "rope_mixed", False)
        ):
            raise ValueError(
                "the Backbone adapts timm's Eva with one rotary embedding for all blocks that "
                f"computes the rows of any grid (built with dynamic_img_size), not "
                f"{type(rope).__name__}"
            )
        n = model.num_prefix_tokens
        if not all(
            type(b) is EvaBlock and type(b.attn) is EvaAttention and b.attn.num_prefix_tokens == n
            for b in blocks
        ):
            raise ValueError(
                "the Backbone adapts timm's Eva of pre-norm EvaBlocks with EvaAttention "
                f"skipping the model's {n} prefix tokens"
            )
        self.tables: dict[tuple[Any, ...], Tensor] = {}

    def table(self, rope: nn.Module, grid: tuple[int, int]) -> Tensor:
        """(h*w, 2 * head_dim) rows of the grid, row-major: sin | cos (timm's `get_embed`)."""
        if (rope.training and getattr(rope, "aug_active", False)) or torch.compiler.is_compiling():
            return rope.get_embed(shape=list(grid))
        buffer = next(rope.buffers())
        key = (tuple(grid), buffer.device, buffer.dtype, torch.is_inference_mode_enabled())
        if key not in self.tables:
            self.tables[key] = rope.get_embed(shape=list(grid))
        return self.tables[key]

    def drop_patches(
        self, backbone: Backbone, x: Tensor, num_prefix: int
    ) -> tuple[Tensor, Tensor | None]:
        """Eva's patch dropout (timm's function, its rate and order) on the tokens past every
        prefix token: (tokens, the kept patches' indices (B, K') or None)."""
        drop = backbone.patch_drop
        if drop is None:
            return x, None
        return patch_dropout_forward(x, drop.prob, num_prefix, drop.ordered, drop.training)

    def block_kwargs(
        self,
        backbone: Backbone,
        grid: tuple[int, int],
        ids_keep: Tensor | None,
        dropped: Tensor | None,
        num_extra: int,
    ) -> dict[str, Tensor]:
        """{"rope": (N, 2 Dh) or (B, 1, N, 2 Dh)}: the rows of the N rotated tokens in order."""
        rows = self.table(backbone.rope, grid)
        if ids_keep is not None:
            rows = rows[ids_keep]  # (B, K, 2 Dh)
        if dropped is not None:
            rows = rows.expand(dropped.shape[0], -1, -1) if rows.ndim == 2 else rows
            rows = torch.gather(rows, 1, dropped.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))
        if num_extra:
            sin, cos = rows.new_zeros(num_extra, rows.shape[-1] // 2), rows.new_ones(1, 1)
            identity = torch.cat([sin, cos.expand_as(sin)], 1)
            identity = identity.expand(*rows.shape[:-2], -1, -1)
            rows = torch.cat([identity, rows], dim=-2)
        return {"rope": rows if rows.ndim == 2 else rows.unsqueeze(1)}


POSITIONS: dict[type, type] = {VisionTransformer: AbsolutePositions, Eva: RotaryPositions}
"""timm model class -> how its positions reach the blocks: the one place the families differ
in `Backbone.forward` (attention read-outs differ by attention class: `ATTENTION_PROBS`)."""


def positions_of(model: nn.Module) -> AbsolutePositions | RotaryPositions:
    """The positions adapter of a timm model (the first class of its MRO in POSITIONS)."""
    cls = next((c for c in type(model).__mro__ if c in POSITIONS), None)
    if cls is None:
        raise ValueError(
            f"the Backbone adapts timm's VisionTransformer and RoPE Eva models, not "
            f"{type(model).__name__}"
        )
    return POSITIONS[cls](model)


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
        self.positions = positions_of(model)
        """How positions reach the blocks: `AbsolutePositions` or `RotaryPositions`."""
        for attr in ("cls_token", "dist_token", "reg_token", "pos_embed"):
            setattr(self, attr, getattr(model, attr, None))
        for attr, param in model.named_parameters(recurse=False):
            setattr(self, attr, param)
        for attr, child in model.named_children():
            setattr(self, attr, child)
        for attr in ("patch_drop", "rope"):  # None in some models (Eva without patch dropout)
            if attr not in self._modules:
                setattr(self, attr, None)
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
        these, this is timm's `forward_features`. A rotary model (timm's RoPE Eva) rotates q and k
        of every non-prefix token by its own patch's position, kept, masked or dropped alike;
        extra prefix tokens are not rotated.
        """
        seq = self.embed(images, ids_keep=ids_keep, mask=mask, mask_token=mask_token, prefix=prefix)
        x, layers, attn = seq.x, [], []
        for i, block in enumerate(self.blocks):
            # read inside the block's call, where a sharding wrapper (FSDP) has gathered its weights
            hook = (
                block.register_forward_pre_hook(
                    lambda b, a, k: attn.append(attention_probs(b, a[0], k.get("rope"))),
                    with_kwargs=True,
                )
                if return_attn and i == self.depth - 1
                else None
            )
            x = self.run_block(i, x, seq)
            if hook is not None:
                hook.remove()
            if i >= self.depth - n_last:
                layers.append(self.norm(x))
        x = layers[-1] if n_last > 0 else self.norm(x)
        return BackboneOutput(x, seq.num_prefix, layers, attn[0] if attn else None)

    def embed(
        self,
        images: Tensor,
        *,
        ids_keep: Tensor | None = None,
        mask: Tensor | None = None,
        mask_token: Tensor | None = None,
        prefix: Tensor | None = None,
    ) -> BlockInput:
        """The token sequence entering block 0 (`forward`'s arguments, the same meaning): patch
        embedding, masking, prefix tokens, position embedding, patch dropout, norm_pre."""
        grid = self.patch_embed.dynamic_feat_size(images.shape[-2:])
        x = self.patch_embed(images)  # (B, L, D); (B, h, w, D) if built with dynamic_img_size
        x = x.flatten(1, -2)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype).view(1, 1, -1), x)
        n_own = self.num_prefix_tokens
        tokens = (self.cls_token, self.dist_token, self.reg_token)  # timm's order
        own = [t.expand(x.shape[0], -1, -1) for t in tokens if t is not None]
        if self.pos_embed is not None:
            n_pos_prefix = 0 if self.no_embed_class else n_own
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
        x, dropped = self.positions.drop_patches(self, self.pos_drop(x), num_prefix)
        seq = BlockInput(self.norm_pre(x), num_prefix, tuple(grid), ids_keep, dropped)
        seq.kw = self.positions.block_kwargs(self, seq.grid, ids_keep, dropped, num_prefix - n_own)
        return seq

    def add_prefix(self, seq: BlockInput, x: Tensor, tokens: Tensor) -> BlockInput:
        """Tokens (B, P, D) joined to the sequence `x` (B, T, D) of `seq` between a block and
        the next, right after its prefix tokens (no position embedding: a rotary model leaves
        them unrotated) -> the new sequence; run on with `run_block(i, new.x, new)`."""
        n = seq.num_prefix
        joined = torch.cat([x[:, :n], tokens.to(x.dtype), x[:, n:]], dim=1)
        new = BlockInput(joined, n + tokens.shape[1], seq.grid, seq.ids_keep, seq.dropped)
        n_extra = new.num_prefix - self.num_prefix_tokens
        new.kw = self.positions.block_kwargs(self, seq.grid, seq.ids_keep, seq.dropped, n_extra)
        return new

    def run_block(
        self, i: int, x: Tensor, seq: BlockInput, attn_mask: Tensor | None = None
    ) -> Tensor:
        """Block i on tokens x (B, T, D) of the sequence `seq` (its positions' keyword
        arguments), with an optional attention mask (B, 1 or heads, T, T), bool (True: may
        attend) or additive; checkpointed with `grad_checkpointing` while gradients are on."""
        kw = seq.kw if attn_mask is None else {**seq.kw, "attn_mask": attn_mask}
        block = self.blocks[i]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, **kw)
        return block(x, **kw)

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


def attention_probs(block: nn.Module, x: Tensor, rope: Tensor | None = None) -> Tensor:
    """(B, heads, T, T) softmax attention of a timm ViT block on its input x (B, T, D), with the
    rotary rows `rope` the block is called with (Eva; None for a VisionTransformer's `Block`).

    Recomputed eagerly because fused SDPA attention never materialises the probabilities.
    """
    probs = ATTENTION_PROBS.get(type(block.attn), _qkv_attention_probs)
    return probs(block, x, rope)


def _qkv_attention_probs(block: nn.Module, x: Tensor, rope: Tensor | None) -> Tensor:
    """timm's VisionTransformer `Attention`: softmax(q k^T scale) from its packed qkv."""
    attn = block.attn
    qkv = rearrange(attn.qkv(block.norm1(x)), "b t (k h d) -> k b h t d", k=3, h=attn.num_heads)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _eva_attention_probs(block: nn.Module, x: Tensor, rope: Tensor | None) -> Tensor:
    """timm's `EvaAttention`, by its own computation (q / v biases, q / k norms, the rotation of q
    and k past its prefix tokens): run unfused on norm1(x) in eval mode (no dropout, no RNG
    drawn), its softmax caught where it enters the attention dropout."""
    attn, caught = block.attn, []
    hook = attn.attn_drop.register_forward_pre_hook(lambda m, a: caught.append(a[0]))
    fused, training = attn.fused_attn, attn.training
    attn.fused_attn = False
    attn.eval()
    try:
        attn(block.norm1(x), rope=rope)
    finally:
        attn.fused_attn = fused
        attn.train(training)
        hook.remove()
    return caught[0]


ATTENTION_PROBS = {EvaAttention: _eva_attention_probs}
"""Attention class -> its probabilities' read-out; any other (VisionTransformer's `Attention`
and its kin, with a packed `qkv`) `_qkv_attention_probs`."""
