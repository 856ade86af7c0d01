"""Drawing: heat-map overlays as tensors (shared by the PNGs and TensorBoard) and the matplotlib
figures of each command. Figures are built on matplotlib's object API with the Agg canvas (no
pyplot, no display) and saved at a fixed size, so a PNG's pixel size follows from its layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

DPI = 100
PANEL_PX = 160
"""Side of one image panel of the attention and MAE grids, in pixels."""
POS_EMBED_PX = (800, 800)
DISTANCE_PX = (640, 480)
HEAT_ALPHA = 0.6
DIM_OUTSIDE = 0.2
"""Brightness left outside a threshold mask."""


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., h, w) per-patch values -> (..., H, W), each patch a constant block (nearest)."""
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    return F.interpolate(flat, size=size, mode="nearest")[:, 0].reshape(*maps.shape[:-2], *size)


def heat_overlay(image: Tensor, heat: Tensor, cmap: str = "inferno") -> Tensor:
    """image (3, H, W) in [0, 1], heat (h, w) on the patch grid -> (3, H, W) in [0, 1]: the heat
    map, min-max scaled on its own and coloured, blended over the image."""
    heat = upsample(heat, image.shape[-2:]).cpu()
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    colour = torch.from_numpy(matplotlib.colormaps[cmap](heat.numpy())[..., :3]).permute(2, 0, 1)
    return (1 - HEAT_ALPHA) * image.cpu() + HEAT_ALPHA * colour.to(image.dtype)


def dim_outside(image: Tensor, mask: Tensor) -> Tensor:
    """image (3, H, W) in [0, 1], mask (h, w) bool on the patch grid -> the image darkened where
    the mask is False."""
    keep = upsample(mask.float(), image.shape[-2:]).to(image.device)
    return image * (DIM_OUTSIDE + (1 - DIM_OUTSIDE) * keep)


def panel_grid(rows: Sequence[Sequence[tuple[str, Tensor | None]]]) -> Figure:
    """A figure of PANEL_PX square panels: rows of (title, (3, H, W) image in [0, 1] or None for an
    empty panel); every row as long as the first."""
    n_rows, n_cols = len(rows), len(rows[0])
    fig = Figure(figsize=(n_cols * PANEL_PX / DPI, n_rows * PANEL_PX / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.99 - 0.1 / n_rows, hspace=0.12)
    for row, ax_row in zip(rows, axes, strict=True):
        for (title, image), ax in zip(row, ax_row, strict=True):
            ax.set_axis_off()
            if image is not None:
                ax.imshow(image.permute(1, 2, 0).float().cpu().numpy(), interpolation="nearest")
            ax.set_title(title, fontsize=8, pad=2)
    return fig


def pos_embed_figure(sim: Tensor, grid: tuple[int, int]) -> Figure:
    """sim (L, L) -> ViT Figure 7 left: tile (r, c) shows patch (r, c)'s similarity to every
    patch, tiles laid out on the patch grid, one pixel apart."""
    h, w = grid
    tiles = sim.float().cpu().reshape(h, w, h, w)
    mosaic = torch.full((h * (h + 1) - 1, w * (w + 1) - 1), float("nan"))
    for r in range(h):
        for c in range(w):
            mosaic[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = tiles[r, c]
    fig = Figure(figsize=(POS_EMBED_PX[0] / DPI, POS_EMBED_PX[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.08, 0.72, 0.84))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(mosaic.numpy(), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([c * (w + 1) + (w - 1) / 2 for c in range(w)], [str(c + 1) for c in range(w)])
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(h)], [str(r + 1) for r in range(h)])
    ax.tick_params(length=0, labelsize=7)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    ax.set_title("Position embedding similarity")
    cax = fig.add_axes((0.86, 0.08, 0.03, 0.84))
    fig.colorbar(im, cax=cax).set_label("Cosine similarity")
    return fig


def distance_figure(distances: Tensor, image_px: int) -> Figure:
    """distances (depth, heads) in pixels -> ViT Figure 7 right: one point per head per layer,
    coloured by head; y from 0 to the image side."""
    depth, heads = distances.shape
    fig = Figure(figsize=(DISTANCE_PX[0] / DPI, DISTANCE_PX[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.12, 0.12, 0.68, 0.8))
    cmap = matplotlib.colormaps["tab20" if heads > 10 else "tab10"]
    for head in range(heads):
        ax.scatter(
            range(1, depth + 1),
            distances[:, head].cpu().numpy(),
            s=18,
            color=cmap(head % cmap.N),
            label=f"Head {head + 1}",
        )
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_xticks(range(1, depth + 1))
    ax.set_ylim(0, image_px)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return fig


def save(fig: Figure, path: str | Path) -> tuple[int, int]:
    """Write fig as a PNG (parent folders made); returns its (width, height) in pixels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    with Image.open(path) as im:
        return im.size
