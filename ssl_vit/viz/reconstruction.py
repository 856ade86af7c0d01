"""MAE reconstructions: the four panels of the paper's figures, and the full MAE (encoder and
decoder) from our run directories or the official `*_full.pth` / visualize checkpoints."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import Tensor

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config
from ssl_vit.methods.mae import MAE, MAEConfig, patch_mean_std
from ssl_vit.ops import patchify, unpatchify
from ssl_vit.viz.images import to_pixels
from ssl_vit.weights import (
    CheckpointError,
    latest_checkpoint,
    load_pretrained,
    parse_checkpoint,
    read_checkpoint,
)

PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")
MASKED_GREY = 0.5
"""Pixel value shown for the removed patches."""


@torch.no_grad()
def mae_panels(
    mae: MAE, images: Tensor, noise: Tensor, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """images (B, C, H, W) normalised, noise (B, L) fixing the mask -> (B, 4, C, H, W) in [0, 1]:
    PANELS = original | masked (removed patches grey) | reconstruction (every patch predicted) |
    reconstruction with the visible patches pasted in (= MAE.reconstruct).

    Under norm_pix_loss the decoder predicts each patch normalised by its own mean and std, so each
    prediction is de-normalised with the statistics of the input patch it stands for (as
    MAE.reconstruct does); every panel is then mapped back to pixels with the data mean / std.
    """
    p = mae.backbone.patch_size
    h, w = images.shape[-2] // p, images.shape[-1] // p
    out = mae.forward_loss(images, noise)
    target = patchify(images, p)
    pred = out["pred"].to(target.dtype)
    if mae.cfg.norm_pix_loss:
        patch_mean, patch_std = patch_mean_std(target)
        pred = pred * patch_std + patch_mean
    removed = out["mask"].bool().unsqueeze(-1).expand_as(target)  # (B, L, p*p*C)
    original = to_pixels(images, mean, std)
    removed_px = unpatchify(removed.to(images.dtype), p, h, w).bool()
    return torch.stack(
        [
            original,
            original.masked_fill(removed_px, MASKED_GREY),
            to_pixels(unpatchify(pred, p, h, w), mean, std),
            to_pixels(unpatchify(torch.where(removed, pred, target), p, h, w), mean, std),
        ],
        dim=1,
    )


def load_mae(checkpoint: str | Path, norm_pix: Literal["auto", "true", "false"] = "auto") -> MAE:
    """The full MAE (encoder + decoder), in eval mode, from a checkpoint that holds the decoder.

    Our run directory (its config.json and newest complete checkpoint, or a `checkpoints/step_*`
    folder of it): keys `backbone.*`, `mask_token`, `decoder_*`. An official MAE `*_full.pth`,
    visualize or training checkpoint: the encoder through `load_pretrained`, the decoder's width,
    depth and MLP ratio from its shapes (16 heads, as every official decoder).

    norm_pix: whether predictions are norm-pix patches; auto = the run's config, else the file's
    training `args`, else False for the official visualize checkpoints (trained on pixels) and
    True for the others (the documented recipes).
    """
    path, _ = parse_checkpoint(checkpoint)
    mae = _load_run(path) if path.is_dir() else _load_official(checkpoint, path)
    if norm_pix != "auto":
        mae.cfg.norm_pix_loss = norm_pix == "true"
    return mae.eval()


def _load_run(path: Path) -> MAE:
    if (path / "config.json").is_file():
        run_dir, step = path, latest_checkpoint(path)
        if step is None:
            raise CheckpointError(f"{path}: no complete checkpoint under checkpoints/")
    elif (path / "model.safetensors").is_file():
        run_dir, step = path.parent.parent, path
    else:
        raise CheckpointError(
            f"{path}: not a run directory (config.json) or one of its checkpoints/step_* folders"
        )
    saved = json.loads((run_dir / "config.json").read_text())
    if saved["method"]["name"] != "mae":
        raise CheckpointError(
            f"{run_dir}: a {saved['method']['name']} run; MAE reconstructions need an MAE run's "
            "decoder"
        )
    cfg = Config.from_dict(saved, {"mae": MAEConfig})
    mae = MAE(Backbone(cfg.model.name, **cfg.model.timm_kwargs()), cfg.method)
    mae.load_state_dict(load_file(str(step / "model.safetensors")))
    return mae


def _load_official(checkpoint: str | Path, path: Path) -> MAE:
    obj = read_checkpoint(path)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "decoder_pred.weight" not in state:
        raise CheckpointError(
            f"{path}: holds no MAE decoder (decoder_* keys); reconstructions need a run "
            "directory of ours or an official *_full.pth / visualize checkpoint"
        )
    backbone = load_pretrained(checkpoint)
    encoder = {f"backbone.{k}": v.clone() for k, v in backbone.state_dict().items()}
    dec_dim = state["decoder_embed.weight"].shape[0]
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks.")}
    args = obj.get("args")
    cfg = MAEConfig(
        mask_ratio=getattr(args, "mask_ratio", MAEConfig.mask_ratio),
        decoder_dim=dec_dim,
        decoder_depth=max(blocks) + 1,
        decoder_mlp_ratio=state["decoder_blocks.0.mlp.fc1.weight"].shape[0] / dec_dim,
        norm_pix_loss=getattr(args, "norm_pix_loss", "visualize" not in path.name),
    )
    mae = MAE(backbone, cfg)  # re-initialises the encoder: its loaded weights are put back below
    decoder = {k: v for k, v in state.items() if k == "mask_token" or k.startswith("decoder_")}
    mae.load_state_dict(encoder | decoder)
    return mae
