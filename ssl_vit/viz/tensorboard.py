"""Image summaries of a model being trained, for TensorBoard."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.utils import make_grid

from ssl_vit.config import IMAGENET_MEAN, IMAGENET_STD
from ssl_vit.methods.mae import MAE
from ssl_vit.methods.protocol import Method
from ssl_vit.viz.attention import cls_attention_maps
from ssl_vit.viz.images import to_pixels
from ssl_vit.viz.reconstruction import mae_panels
from ssl_vit.viz.render import heat_overlay

PAD = 2
"""Pixels between the tiles of a summary grid."""


@torch.no_grad()
def tensorboard_images(
    method: Method,
    images: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Image summaries of `method` on a fixed batch images (N, C, H, W), normalised by mean / std.

    Returns CPU (3, rows * (H + PAD) + PAD, cols * (W + PAD) + PAD) grids in [0, 1], one row per
    image, for `SummaryWriter.add_image`:
      "attention": image | each head's last-block cls->patch attention | their mean, of the
        exported backbone (DINO: the teacher's); only when it has a cls token;
      "mae_reconstruction": original | masked | reconstruction | with the visible patches, for
        MAE; the mask is drawn from `seed`, the same at every call.
    Runs in eval mode and never touches the global RNG, so calling it leaves training unchanged.
    """
    was_training = method.training
    method.eval()
    try:
        out = {}
        pixels = to_pixels(images.float(), mean, std).cpu()
        backbone = method.export_backbone()
        res = backbone(images, return_attn=True)
        if res.num_prefix:
            p = backbone.patch_size
            grid = (images.shape[-2] // p, images.shape[-1] // p)
            maps = cls_attention_maps(res.attn, res.num_prefix, grid)
            maps = torch.cat([maps, maps.mean(dim=1, keepdim=True)], dim=1).cpu()
            tiles = [
                torch.stack([img, *(heat_overlay(img, m) for m in img_maps)])
                for img, img_maps in zip(pixels, maps, strict=True)
            ]
            out["attention"] = make_grid(torch.cat(tiles), nrow=maps.shape[1] + 1, padding=PAD)
        if isinstance(method, MAE):
            p = method.backbone.patch_size
            num_patches = (images.shape[-2] // p) * (images.shape[-1] // p)
            gen = torch.Generator().manual_seed(seed)
            noise = torch.rand(images.shape[0], num_patches, generator=gen).to(images.device)
            panels = mae_panels(method, images, noise, mean, std).float().cpu()
            out["mae_reconstruction"] = make_grid(
                panels.flatten(0, 1), nrow=panels.shape[1], padding=PAD
            )
        return out
    finally:
        method.train(was_training)
