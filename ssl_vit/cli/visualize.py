"""`ssl-vit visualize`: pictures of what a checkpoint learned, one PNG per command.

    ssl-vit visualize attention --checkpoint CKPT [--image PATH] [--threshold 0.6]
    ssl-vit visualize mae --checkpoint RUN_DIR [--image A.jpg,B.jpg | --data.path ...]
    ssl-vit visualize pca --checkpoint CKPT [--image A.jpg,B.jpg | --data.path DIR] [--img_size 448]
    ssl-vit visualize pos-embed --checkpoint CKPT
    ssl-vit visualize attention-distance --checkpoint CKPT [--num_images 128]

CKPT is anything `--checkpoint` accepts (`load_pretrained`); `mae` needs the decoder: our MAE run
directory or an official `*_full.pth` / visualize file. A command's own options are `--viz.field`
or just `--field`; images come from `--image` files or from `--data.*` (its evaluation split when
it has one, else its training split; the synthetic dataset by default). Each command writes its
PNG to --output and prints one JSON line saying what it wrote.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from matplotlib.figure import Figure

from ssl_vit.backbone import Backbone
from ssl_vit.cli.runner import Args, run_command
from ssl_vit.config import ConfigError, EvalDataConfig, field_errors
from ssl_vit.viz.attention import (
    cls_attention_maps,
    layer_attentions,
    mean_attention_distance,
    threshold_mask,
)
from ssl_vit.viz.images import dataset_images, load_image, load_images, picture_split, to_pixels
from ssl_vit.viz.pca import pca_rgb
from ssl_vit.viz.pos_embed import patch_pos_embed, pos_embed_similarity
from ssl_vit.viz.reconstruction import PANELS, load_mae, mae_panels
from ssl_vit.viz.render import (
    dim_outside,
    distance_figure,
    heat_overlay,
    panel_grid,
    pos_embed_figure,
    save,
)
from ssl_vit.weights import CheckpointError, load_pretrained


@dataclass
class AttentionConfig:
    image: str = ""
    """Image file; '' = the first image of data.val_split of data.path."""
    threshold: float = 0.0
    """Also show, per map, the fewest patches holding this fraction of its attention mass (DINO
    shows 0.6); 0 = no mask row."""
    img_size: int = 0
    """Resize the image's short side to this (then crop to whole patches); 0 = the model's own."""
    output: str = "attention.png"
    """PNG to write."""

    def errors(self) -> list[str]:
        return field_errors(self, "viz", {">= 0": "img_size", "in [0, 1]": "threshold"})


@dataclass
class MAEVizConfig:
    image: str = ""
    """Image files, comma-separated (short side resized, centre-cropped square); '' = num_images
    images of data.path."""
    num_images: int = 4
    """Images (rows) from data.path, when no image is given."""
    mask_ratio: float = 0.0
    """Fraction of patches removed; 0 = the one the model was trained with."""
    seed: int = 0
    """Seed of the masks."""
    norm_pix: Literal["auto", "true", "false"] = "auto"
    """Whether the decoder predicts norm-pix patches; auto = from the run's config (official
    files: their args, else false for visualize checkpoints, true for the others)."""
    output: str = "mae.png"
    """PNG to write."""

    def errors(self) -> list[str]:
        return field_errors(self, "viz", {">= 1": "num_images", "in [0, 1)": "mask_ratio"})


@dataclass
class PCAConfig:
    image: str = ""
    """Image files, comma-separated (short side resized, centre-cropped square); '' = num_images
    images of data.path."""
    num_images: int = 4
    """Images from data.path, when no image is given."""
    img_size: int = 0
    """Image side (position embedding resampled; DINOv2's figures use 448+); 0 = the model's own."""
    threshold: float = 0.0
    """Foreground: patches whose standardised first component exceeds this."""
    remove_background: bool = True
    """Black out the background (the first component's low side); false colours every patch."""
    output: str = "pca.png"
    """PNG to write."""

    def errors(self) -> list[str]:
        return field_errors(self, "viz", {">= 1": "num_images", ">= 0": "img_size"})


@dataclass
class PosEmbedConfig:
    output: str = "pos_embed.png"
    """PNG to write."""

    def errors(self) -> list[str]:
        return []


@dataclass
class DistanceConfig:
    num_images: int = 128
    """Images averaged over (the ViT paper: 128), from data.val_split of data.path."""
    batch_size: int = 32
    """Images per forward pass."""
    img_size: int = 0
    """Image side; 0 = the model's own."""
    output: str = "attention_distance.png"
    """PNG to write."""

    def errors(self) -> list[str]:
        return field_errors(self, "viz", {">= 1": "num_images batch_size", ">= 0": "img_size"})


@dataclass
class VizRoot:
    """What one `ssl-vit visualize` command runs: its own options and, when it reads images, the
    data (mean / std also de-normalise the pictures)."""

    viz: Any = None
    """The command's options (AttentionConfig, ...)."""
    data: EvalDataConfig | None = field(default_factory=EvalDataConfig)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _native_size(backbone: Backbone) -> int:
    return backbone.grid_size[0] * backbone.patch_size


@torch.no_grad()
def attention(checkpoint: str, root: VizRoot) -> tuple[Figure, dict[str, Any]]:
    """Image | each head's last-block cls->patch attention | their mean, overlaid; with a
    threshold, a second row keeping the fewest patches that hold that fraction of each map."""
    c, d = root.viz, root.data
    backbone = load_pretrained(checkpoint).to(_device()).eval()
    if backbone.num_prefix_tokens < 1:
        raise CheckpointError(f"{checkpoint}: the backbone has no cls token to show attention of")
    p = backbone.patch_size
    size = c.img_size or _native_size(backbone)
    if c.image:
        x = load_image(c.image, size, p, d.mean, d.std)
    else:
        x = dataset_images(d, 1, size)
    x = x.to(_device())
    out = backbone(x, return_attn=True)
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    maps = cls_attention_maps(out.attn, out.num_prefix, grid)[0]  # (heads, h, w)
    maps = torch.cat([maps, maps.mean(dim=0, keepdim=True)])
    titles = [f"head {i + 1}" for i in range(backbone.num_heads)] + ["mean"]
    image = to_pixels(x[0], d.mean, d.std).cpu()
    rows = [
        [("image", image)]
        + [(t, heat_overlay(image, m)) for t, m in zip(titles, maps, strict=True)]
    ]
    if c.threshold:
        masks = threshold_mask(maps.flatten(1), c.threshold).unflatten(1, grid).cpu()
        rows.append(
            [(f"{c.threshold:g} of the mass", None)]
            + [
                (f"{t}: {int(m.sum())} patches", dim_outside(image, m))
                for t, m in zip(titles, masks, strict=True)
            ]
        )
    source = c.image or f"{d.path}:{picture_split(d)}[0]"
    return panel_grid(rows), {"image": source, "heads": backbone.num_heads, "grid": list(grid)}


@torch.no_grad()
def mae(checkpoint: str, root: VizRoot) -> tuple[Figure, dict[str, Any]]:
    """Rows of original | masked | reconstruction | reconstruction + visible patches."""
    c, d = root.viz, root.data
    model = load_mae(checkpoint, c.norm_pix).to(_device())
    if c.mask_ratio:
        model.cfg.mask_ratio = c.mask_ratio
    size, p = _native_size(model.backbone), model.backbone.patch_size
    if c.image:
        x = load_images(c.image, size, p, d.mean, d.std)
    else:
        x = dataset_images(d, c.num_images, size)
    x, n = x.to(_device()), len(x)
    gen = torch.Generator().manual_seed(c.seed)
    noise = torch.rand(n, model.backbone.num_patches, generator=gen).to(_device())
    panels = mae_panels(model, x, noise, d.mean, d.std).cpu()
    rows = [
        [(PANELS[j] if i == 0 else "", panels[i, j]) for j in range(len(PANELS))] for i in range(n)
    ]
    info = {
        "images": c.image.split(",") if c.image else f"{d.path}:{picture_split(d)}[:{n}]",
        "num_images": n,
        "mask_ratio": model.cfg.mask_ratio,
        "norm_pix": model.cfg.norm_pix_loss,
        "columns": list(PANELS),
    }
    return panel_grid(rows), info


@torch.no_grad()
def pca(checkpoint: str, root: VizRoot) -> tuple[Figure, dict[str, Any]]:
    """The images over the first 3 principal components of their last-block patch features as
    RGB, one PCA over all images, background removed by the first component (DINOv2, Fig. 1)."""
    c, d = root.viz, root.data
    backbone = load_pretrained(checkpoint).to(_device()).eval()
    p = backbone.patch_size
    size = c.img_size or _native_size(backbone)
    if size % p:
        raise ConfigError([f"viz.img_size: {size} is not a multiple of the patch size {p}"])
    if c.image:
        x = load_images(c.image, size, p, d.mean, d.std)
    else:
        x = dataset_images(d, c.num_images, size)
    out = backbone(x.to(_device()))
    grid = (size // p, size // p)
    rgb, fg, explained = pca_rgb(
        out.tokens[:, out.num_prefix :].float().cpu(), grid, c.threshold, c.remove_background
    )
    pixels = to_pixels(x, d.mean, d.std)
    names = c.image.split(",") if c.image else [f"image {i + 1}" for i in range(len(x))]
    rgb = torch.nn.functional.interpolate(rgb, size=(size, size))  # nearest: a block per patch
    rows = [
        [(n.rsplit("/", 1)[-1], img) for n, img in zip(names, pixels, strict=True)],
        [
            (f"{100 * float(m.float().mean()):.0f}% foreground", im)
            for m, im in zip(fg, rgb, strict=True)
        ],
    ]
    info = {
        "images": names if c.image else f"{d.path}:{picture_split(d)}[:{len(x)}]",
        "grid": list(grid),
        "foreground": [round(float(m.float().mean()), 4) for m in fg],
        "explained_variance": [round(v, 4) for v in explained.tolist()],
    }
    return panel_grid(rows), info


def pos_embed(checkpoint: str, root: VizRoot) -> tuple[Figure, dict[str, Any]]:
    """Cosine similarity of each patch's position embedding to all others, grid of grids."""
    backbone = load_pretrained(checkpoint)
    if backbone.pos_embed is None:
        raise CheckpointError(
            f"{checkpoint}: {backbone.name} has no absolute position embedding to show (rotary "
            "positions: computed for each grid, not learned)"
        )
    sim = pos_embed_similarity(patch_pos_embed(backbone))
    return pos_embed_figure(sim, backbone.grid_size), {"grid": list(backbone.grid_size)}


@torch.no_grad()
def attention_distance(checkpoint: str, root: VizRoot) -> tuple[Figure, dict[str, Any]]:
    """Mean attention distance (pixels) per head per layer, averaged over num_images images."""
    c, d = root.viz, root.data
    backbone = load_pretrained(checkpoint).to(_device()).eval()
    p = backbone.patch_size
    size = c.img_size or _native_size(backbone)
    if size % p:
        raise ConfigError([f"viz.img_size: {size} is not a multiple of the patch size {p}"])
    grid = (size // p, size // p)

    def per_head(attn: torch.Tensor) -> torch.Tensor:  # (B, heads, T, T) -> (heads,) summed
        return mean_attention_distance(attn, backbone.num_prefix_tokens, grid, p).sum(dim=0)

    total = torch.zeros(backbone.depth, backbone.num_heads)
    for chunk in dataset_images(d, c.num_images, size).split(c.batch_size):
        total += torch.stack(layer_attentions(backbone, chunk.to(_device()), per_head)).cpu()
    distances = total / c.num_images
    info = {
        "num_images": c.num_images,
        "image_px": size,
        "mean_distance_px": [[round(v, 3) for v in layer] for layer in distances.tolist()],
    }
    return distance_figure(distances, size), info


COMMANDS: dict[str, tuple[type, bool, Callable[[str, VizRoot], tuple[Figure, dict]]]] = {
    "attention": (AttentionConfig, True, attention),
    "mae": (MAEVizConfig, True, mae),
    "pca": (PCAConfig, True, pca),
    "pos-embed": (PosEmbedConfig, False, pos_embed),
    "attention-distance": (DistanceConfig, True, attention_distance),
}
"""Command -> (its options, whether it reads images (a data section), what it draws)."""

USAGE = (__doc__ or "").split("\n\n", 1)[1]


def short_flags(argv: list[str]) -> list[str]:
    """A flag without a section (`--threshold`) is the command's own (`--viz.threshold`)."""
    shaping = ("--help", "--checkpoint", "--config", "--print-config")
    return [
        f"--viz.{a[2:]}"
        if a.startswith("--") and "." not in a.split("=")[0] and a not in shaping
        else a
        for a in argv
    ]


def main(argv: list[str]) -> int:
    """`ssl-vit visualize COMMAND --checkpoint CKPT [...]`: one PNG and one JSON line; exit
    status 0, or 2 on a usage, config, data or checkpoint error (printed to stderr)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: ssl-vit visualize COMMAND --checkpoint CKPT [...]\n\n{USAGE}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(
            f"error: unknown visualize command {command!r}; known: {list(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    options, reads_images, draw = COMMANDS[command]

    def root(args: Args) -> VizRoot:
        return VizRoot(viz=options(), data=EvalDataConfig() if reads_images else None)

    def run(root: VizRoot, args: Args) -> dict[str, Any]:
        checkpoint = args["--checkpoint"]
        errors = root.viz.errors()
        if not checkpoint:
            errors.append("--checkpoint: required (a run directory or any checkpoint file)")
        if errors:
            raise ConfigError(errors)
        fig, info = draw(checkpoint, root)
        width, height = save(fig, root.viz.output)
        result = {"command": f"visualize {command}", "checkpoint": str(checkpoint)}
        return result | {"output": root.viz.output, "width": width, "height": height, **info}

    prog = f"ssl-vit visualize {command} --checkpoint CKPT [--FIELD VALUE = --viz.FIELD VALUE]"
    return run_command(root, short_flags(argv[1:]), prog, run, flags={"--checkpoint": ""})
