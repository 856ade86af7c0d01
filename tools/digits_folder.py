"""Write scikit-learn's handwritten digits as an image folder: real labelled data, no download.

    python tools/digits_folder.py DIR [--size 32 --val-fraction 0.2 --seed 0]

`sklearn.datasets.load_digits` ships inside scikit-learn (1,797 8x8 grey images, 10 classes,
values 0-16); scikit-learn is not an ssl_vit dependency (`pip install scikit-learn` for this
tool only). Each image is scaled to 0-255, upscaled to size x size (bicubic), made RGB and
written as DIR/{train,val}/<digit>/<index>.png, split per class (stratified, seeded), so that
`--data.path DIR` trains on train/ and evaluates on val/ (docs/fidelity.md, the learning check).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_folder(
    root: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> dict[str, int]:
    """Write the digits under root/train and root/val; returns the image count of each split."""
    from sklearn.datasets import load_digits  # an optional tool dependency, not ssl_vit's

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        n_val = round(len(idx) * val_fraction)
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = Path(root) / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                image = Image.fromarray(images[i]).resize((size, size), Image.Resampling.BICUBIC)
                image.convert("RGB").save(folder / f"{i:04d}.png")
            counts[split] += len(part)
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--size", type=int, default=32, help="side in pixels (default 32)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="per class (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    args = parser.parse_args(argv)
    counts = write_digits_folder(args.dir, args.size, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.dir}")


if __name__ == "__main__":
    main()
