"""Small tensor ops shared by the methods: patchify, random masking, sin-cos pos-embed, EMA,
soft distillation."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def patchify(images: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches row-major; inside a patch: row, column, channel.

    The official MAE ordering (`einsum('nchpwq->nhwpqc')`), so its `decoder_pred` weights map.
    """
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def unpatchify(x: Tensor, p: int, h: int, w: int) -> Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); the inverse of `patchify`."""
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking as the official MAE: argsort uniform noise, keep the first K.

    Returns ids_keep (B, K) long, mask (B, L) float with 0 = kept / 1 = removed, and ids_restore
    (B, L) long, where K = int(L * (1 - mask_ratio)) and ids_restore = argsort(ids_shuffle).

    Without `noise`, it is drawn for the global batch (world x B rows) and this rank's rows are
    sliced out: masks then do not depend on the number of processes, so N processes x batch B train
    exactly like 1 process x batch N*B, while the draw still comes from the global RNG.
    """
    if noise is None:
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        noise = torch.rand(world * batch, num_patches, device=device)[
            rank * batch : (rank + 1) * batch
        ]
    len_keep = int(num_patches * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> Tensor:
    """Fixed 2-D sin-cos position embedding (grid_h*grid_w [+1], dim), float32, row-major grid.

    Reproduces the official MAE `get_2d_sincos_pos_embed` (which meshgrids (w, h)): the first half
    of the channels encodes the column, the second half the row; each half is [sin | cos] of
    position * 1/10000^(i/(dim/4)), i < dim/4. Computed in float64 like the numpy original. The cls
    position (first row when `cls_token`) is zeros.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )

    def encode(pos: Tensor) -> Tensor:  # (M,) -> (M, dim/2)
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


@torch.no_grad()
def ema_update_(target: list[Tensor], source: list[Tensor], momentum: float) -> None:
    """In place: target = momentum * target + (1 - momentum) * source, one fused call per op."""
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, source, alpha=1 - momentum)


def ema_init_share(momentum: float, steps: int) -> float:
    """The weight an EMA still gives its initial value after `steps` updates whose momentum rises
    from `momentum` to 1 on a half cosine (DINO's teacher): prod(m_i) ~ exp(-sum(1 - m_i)), and
    sum(1 - m_i) = (1 - momentum)(steps + 1) / 2 exactly (the cosines sum to 1). At 0.996 over
    440 steps: 0.41, i.e. the teacher ends 41 % random."""
    return math.exp(-(1 - momentum) * (steps + 1) / 2)


def soft_distillation_loss(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """tau^2 KL(softmax(teacher / tau) || softmax(student / tau)) of logits (B, K), summed and
    divided by B x K: DeiT's losses.py reduction (PyTorch's legacy one), not the batch mean."""
    log_p, log_q = F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher / tau, dim=-1)
    return F.kl_div(log_p, log_q, reduction="sum", log_target=True) * tau * tau / student.numel()
