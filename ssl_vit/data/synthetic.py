"""The built-in `synthetic` dataset: procedural images whose class is a shape, texture or layout.

Why: every command must work on a fresh machine with no download, and a smoke run should learn
something real. So a class is visual structure (a disc, a ring, vertical stripes, a dot grid, ...);
colours (a pair from a small palette), position, scale, rotation, phase and noise are drawn at
random per image and carry no class information, so an encoder has to look at structure.

Each class is a signed distance field (negative inside the foreground) evaluated with vectorised
torch ops on a pixel-centre grid and anti-aliased over one pixel, so a scene renders at any
resolution (a 224 px image in a few ms). Image i of a split is a pure function of (seed, split, i).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "val")
NOISE_STD = 0.03
"""Per-pixel Gaussian noise, in [0, 1] intensity units."""
PALETTE = 0.1 + 0.8 * torch.tensor(
    [[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0]]
)
"""Background and foreground are two different colours of this palette (the RGB cube's corners,
kept off the clip limits): 56 pairs, so colour tells an image apart from most others but not
from the ~n/56 that share its pair. Continuous random colours would make every image unique by
colour alone, a shortcut that instance-discrimination methods (DINO) learn instead of structure."""
STRIPE_JITTER = math.radians(12)
"""Rotation range of the oriented textures, whose orientation is their class."""


# Shapes: (x, y) local coordinates in which the shape spans about the unit disc -> signed distance.


def _box(x: Tensor, y: Tensor, hx: float, hy: float) -> Tensor:
    qx, qy = x.abs() - hx, y.abs() - hy
    return torch.hypot(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def _bands(u: Tensor, period: Tensor | float) -> Tensor:
    """Half-duty bands across u, foreground centred on u = period/2 + k*period."""
    return (torch.remainder(u / period, 1).sub(0.5).abs() - 0.25) * period


def _to_lines(u: Tensor, period: Tensor | float) -> Tensor:
    """Distance from u to the nearest multiple of period."""
    f = torch.remainder(u / period, 1)
    return torch.minimum(f, 1 - f) * period


def disc(x: Tensor, y: Tensor) -> Tensor:
    return torch.hypot(x, y) - 0.9


def square(x: Tensor, y: Tensor) -> Tensor:
    return _box(x, y, 0.72, 0.72)


def triangle(x: Tensor, y: Tensor) -> Tensor:
    """Equilateral, inscribed in the unit circle (Inigo Quilez's exact distance)."""
    r, k = math.sqrt(3) / 2, math.sqrt(3)
    x, y = x.abs() - r, 0.5 - y
    flip = x + k * y > 0
    x, y = torch.where(flip, (x - k * y) / 2, x), torch.where(flip, (-k * x - y) / 2, y)
    x = x - x.clamp(-2 * r, 0)
    return -torch.hypot(x, y) * torch.sign(y)


def ring(x: Tensor, y: Tensor) -> Tensor:
    return (torch.hypot(x, y) - 0.7).abs() - 0.22


def cross(x: Tensor, y: Tensor) -> Tensor:
    return torch.minimum(_box(x, y, 0.95, 0.28), _box(x, y, 0.28, 0.95))


def star(x: Tensor, y: Tensor) -> Tensor:
    """Five points; radius 1 at a tip, 0.4 between tips (approximate distance)."""
    tip = torch.remainder(torch.atan2(y, x) * 5 / (2 * math.pi), 1).sub(0.5).abs() * 2
    return (torch.hypot(x, y) - (0.4 + 0.6 * tip)) * 0.6


def concentric_squares(x: Tensor, y: Tensor) -> Tensor:
    chebyshev = torch.maximum(x.abs(), y.abs())
    return torch.maximum(_bands(chebyshev - 0.125, 0.5), chebyshev - 1)


def concentric_rings(x: Tensor, y: Tensor) -> Tensor:
    r = torch.hypot(x, y)
    return torch.maximum(_bands(r - 0.125, 0.5), r - 1)


def spiral(x: Tensor, y: Tensor) -> Tensor:
    """Archimedean, one turn per 0.5 radius."""
    r = torch.hypot(x, y)
    return torch.maximum(_bands(r + torch.atan2(y, x) / (4 * math.pi), 0.5) * 0.8, r - 1)


def sectors(x: Tensor, y: Tensor) -> Tensor:
    """Six blades of a pinwheel."""
    r = torch.hypot(x, y)
    return torch.maximum(_bands(torch.atan2(y, x), math.pi / 3) * r, r - 1)


# Textures: fill the image; (x, y, period) -> signed distance, with a random period and phase.


def horizontal_stripes(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    return _bands(y, p)


def vertical_stripes(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    return _bands(x, p)


def diagonal_stripes(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    return _bands((x + y) / math.sqrt(2), p)


def checkerboard(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    dark = (torch.floor(x / p) + torch.floor(y / p)) % 2 == 0
    return torch.minimum(_to_lines(x, p), _to_lines(y, p)) * torch.where(dark, -1.0, 1.0)


def dot_grid(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    return torch.hypot(_to_lines(x + p / 2, p), _to_lines(y + p / 2, p)) - 0.3 * p


def grid_lines(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    return torch.minimum(_to_lines(x, p), _to_lines(y, p)) - 0.12 * p


SHAPES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    f.__name__: f
    for f in (
        disc,
        square,
        triangle,
        ring,
        cross,
        star,
        concentric_squares,
        concentric_rings,
        spiral,
        sectors,
    )
}
TEXTURES: dict[str, tuple[Callable[[Tensor, Tensor, Tensor], Tensor], float]] = {
    "horizontal_stripes": (horizontal_stripes, STRIPE_JITTER),
    "vertical_stripes": (vertical_stripes, STRIPE_JITTER),
    "diagonal_stripes": (diagonal_stripes, STRIPE_JITTER),
    "checkerboard": (checkerboard, math.pi / 2),
    "dot_grid": (dot_grid, math.pi / 2),
    "grid_lines": (grid_lines, math.pi / 2),
}
"""name -> (distance field, rotation range): lattices turn freely; stripes, whose orientation is
their class, only jitter."""

CLASSES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "horizontal_stripes",
    "vertical_stripes",
    "diagonal_stripes",
    "checkerboard",
    "dot_grid",
    "star",
    "concentric_squares",
    "concentric_rings",
    "grid_lines",
    "spiral",
    "sectors",
)
"""Class names by label; `num_classes` takes the first ones (10 by default)."""


def render(name: str, size: int, gen: torch.Generator) -> Tensor:
    """One image of class `name`, nuisances drawn from `gen` -> uint8 (3, size, size)."""
    return render_with_cover(name, size, gen)[0]


def render_with_cover(
    name: str, size: int, gen: torch.Generator, dark_background: bool = False
) -> tuple[Tensor, Tensor]:
    """`render`'s image (the same draws from `gen`) and the fraction of each pixel the shape or
    texture covers, float (size, size) in [0, 1]: the segmentation mask is cover > 0.5. With
    `dark_background` the background is PALETTE[0] and the foreground one of the other colours
    (the segmentation set's: see `SyntheticImages`)."""

    def rand(n: int) -> Tensor:
        return torch.rand(n, generator=gen)

    pick = torch.randperm(len(PALETTE), generator=gen)[:2]
    bg, fg = PALETTE[pick[0]], PALETTE[pick[1]]
    if dark_background:  # the foreground uniform over the other colours
        bg, fg = PALETTE[0], PALETTE[pick[0] if pick[0] else pick[1]]
    if name in SHAPES:
        scale = 0.4 + 0.45 * rand(1)
        shift = (rand(2) * 2 - 1) * (1 - scale) * 0.9  # keeps the shape inside the image
        angle = rand(1) * 2 * math.pi
    else:
        scale = torch.ones(1)
        shift = rand(2) * 2 - 1  # a phase
        angle = (rand(1) * 2 - 1) * TEXTURES[name][1]
    t = (torch.arange(size) + 0.5) / size * 2 - 1  # pixel centres in (-1, 1)
    y, x = torch.meshgrid(t - shift[1], t - shift[0], indexing="ij")
    cos, sin = torch.cos(angle), torch.sin(angle)
    u, v = (x * cos + y * sin) / scale, (y * cos - x * sin) / scale
    if name in SHAPES:
        dist = SHAPES[name](u, v) * scale
    else:
        dist = TEXTURES[name][0](u, v, 0.25 + 0.25 * rand(1))
    cover = (0.5 - dist * size / 2).clamp(0, 1)  # fraction of each pixel inside the edge
    img = bg[:, None, None] + (fg - bg)[:, None, None] * cover
    img = img + NOISE_STD * torch.randn(img.shape, generator=gen)
    return img.mul(255).round_().clamp_(0, 255).to(torch.uint8), cover


class SyntheticImages:
    """`size` procedural images of `num_classes` structural classes.

    item i -> (uint8 (3, image_size, image_size), label = i % num_classes). Image i is a pure
    function of (seed, split, i); "train" and "val" are seeded apart, so they share no image.

    dark_background (the segmentation set, data.segmentation): the background always PALETTE[0],
    so where a shape is shows pixel by pixel while what it is still takes its form. With random
    colour pairs no single patch tells shape from background (either colour can be either), and
    a linear probe on a tiny ViT's patch tokens stays at the frequency baseline.
    """

    def __init__(
        self,
        size: int,
        num_classes: int = 10,
        image_size: int = 224,
        split: str = "train",
        seed: int = 0,
        dark_background: bool = False,
    ):
        if not 10 <= num_classes <= len(CLASSES):
            raise ValueError(f"num_classes must be in [10, {len(CLASSES)}], got {num_classes}")
        if split not in SPLITS:
            raise ValueError(f"no split {split!r}; available: {list(SPLITS)}")
        self.size, self.image_size, self.split, self.seed = size, image_size, split, seed
        self.dark_background = dark_background
        self.classes = list(CLASSES[:num_classes])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, _, label = self.with_cover(i)
        return image, label

    def with_cover(self, i: int) -> tuple[Tensor, Tensor, int]:
        """Item i's image, the fraction of each pixel its shape covers (`render_with_cover`) and
        its label."""
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} synthetic images")
        hi, lo = np.random.SeedSequence([self.seed, SPLITS.index(self.split), i]).generate_state(2)
        gen = torch.Generator().manual_seed(int(hi) << 32 | int(lo))
        label = i % len(self.classes)
        name = self.classes[label]
        return *render_with_cover(name, self.image_size, gen, self.dark_background), label

    def path(self, i: int) -> str:
        return f"synthetic:{self.split}[{i}]"
