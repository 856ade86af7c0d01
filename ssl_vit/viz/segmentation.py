"""Pictures of a segmentation: image | ground truth | prediction rows, masks coloured by one
palette, with a legend of the classes shown (the run directory's PNG), and the same rows as one
tensor grid for TensorBoard."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch
from matplotlib.patches import Patch
from torch import Tensor
from torchvision.utils import make_grid

from ssl_vit.viz.render import DPI, panel_grid, save

IGNORE_INDEX = 255
IGNORE_COLOUR = (0.0, 0.0, 0.0)
"""Ignored pixels (255) are drawn black."""
LEGEND_PX = 180
"""Width of the legend column of the PNG, in pixels."""


def palette(num_classes: int) -> Tensor:
    """(num_classes, 3) colours in [0, 1]: matplotlib's tab20 up to 20 classes (its dark colours
    first, then their light pairs), beyond it colours drawn once from a fixed seed (the same in
    every picture)."""
    if num_classes <= 20:
        tab20 = matplotlib.colormaps["tab20"].colors
        return torch.tensor((tab20[::2] + tab20[1::2])[:num_classes])
    return torch.rand(num_classes, 3, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.2


def colourise(mask: Tensor, colours: Tensor) -> Tensor:
    """(H, W) class ids -> (3, H, W) in [0, 1]; IGNORE_INDEX black."""
    table = torch.cat([colours, torch.tensor([IGNORE_COLOUR])])
    index = torch.where(mask == IGNORE_INDEX, len(colours), mask.long().clamp(0, len(colours) - 1))
    return table[index].permute(2, 0, 1)


def segmentation_grid(samples: Sequence[tuple[Tensor, Tensor, Tensor]], num_classes: int) -> Tensor:
    """[(image (3, H, W) in [0, 1], label (H, W), prediction (H, W))] -> one (3, h, w) grid, a
    row per sample: image | ground truth | prediction (TensorBoard's add_image). Samples of other
    sizes are resized to the first's."""
    colours = palette(num_classes)
    size = samples[0][1].shape[-2:]
    tiles = []
    for image, label, pred in samples:
        row = [image, colourise(label, colours), colourise(pred, colours)]
        row = [torch.nn.functional.interpolate(t[None].float(), size=tuple(size))[0] for t in row]
        tiles += row
    return make_grid(tiles, nrow=3, padding=2)


def segmentation_picture(
    samples: Sequence[tuple[Tensor, Tensor, Tensor]], classes: Sequence[str], path: str | Path
) -> tuple[int, int]:
    """Write the PNG: a row per sample (image | ground truth | prediction) and a legend of the
    classes present in any label or prediction shown. Returns its (width, height) in pixels."""
    colours = palette(len(classes))
    rows = [
        [
            ("image", image),
            ("ground truth", colourise(label, colours)),
            ("prediction", colourise(pred, colours)),
        ]
        for image, label, pred in samples
    ]
    fig = panel_grid(rows)
    shown = sorted(
        {
            int(c)
            for _, label, pred in samples
            for c in torch.cat([label.flatten(), pred.flatten()])
            if int(c) != IGNORE_INDEX
        }
    )
    handles = [Patch(color=colours[c].tolist(), label=classes[c]) for c in shown]
    handles.append(Patch(color=IGNORE_COLOUR, label="ignored (255)"))
    width, height = fig.get_size_inches()
    extra = LEGEND_PX / DPI
    fig.set_size_inches(width + extra, height)
    fig.subplots_adjust(left=0.01 * width / (width + extra), right=width / (width + extra))
    fig.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(width / (width + extra), 0.5),
        fontsize=7,
        frameon=False,
    )
    return save(fig, path)
