"""Write synthetic images into a folder: the image-folder data of benchmarks (docs/performance.md).

    python tools/write_images.py DIR --n 512 --size 256 [--format jpeg|png --quality 90]

`n` images of `ssl_vit.data.SyntheticImages` at size x size, encoded by torchvision as JPEG (at
`quality`) or lossless PNG, written as DIR/000000.jpg (.png), 000001.jpg, ...
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path

from torchvision.io import encode_jpeg, encode_png

from ssl_vit.data import SyntheticImages


def write_image_folder(
    root: str | Path, n: int, size: int, fmt: str = "jpeg", quality: int = 90
) -> Path:
    """Write `n` synthetic size x size images (JPEG at `quality`, or PNG) into `root`, for
    benchmarks and tests; returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images = SyntheticImages(n, image_size=size)
    with warnings.catch_warnings():
        # torchvision 0.29 warns on every encode call that TorchCodec supersedes it
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        for i in range(n):
            image = images[i][0]
            data = encode_jpeg(image, quality=quality) if fmt == "jpeg" else encode_png(image)
            (root / f"{i:06d}.{'jpg' if fmt == 'jpeg' else 'png'}").write_bytes(
                data.numpy().tobytes()
            )
    return root


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--n", type=int, default=512, help="number of images (default 512)")
    parser.add_argument("--size", type=int, default=256, help="side in pixels (default 256)")
    parser.add_argument("--format", choices=("jpeg", "png"), default="jpeg")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    args = parser.parse_args(argv)
    root = write_image_folder(args.dir, args.n, args.size, args.format, args.quality)
    print(f"wrote {args.n} {args.format} images of {args.size}x{args.size} to {root}")


if __name__ == "__main__":
    main()
