"""Write a dataset as shards that `--data.streaming true` reads: WebDataset .tar or Parquet.

    python tools/make_shards.py SRC OUT [--split train] [--format webdataset|parquet]
        [--max_size 256MB] [--max_count 0] [--seed 0 | --keep_order]

SRC is an image folder (class sub-folders give labels; its SPLIT sub-folder when it has one) or a
dataset saved with `datasets`' save_to_disk. Images are stored as their own bytes (nothing is
re-encoded), with their label and id (the index in SRC's sorted order), in an order drawn from
--seed (a stream shuffles only within windows of --data.shuffle_buffer), in shards of at most
--max_size image bytes (and --max_count images), named like the Hugging Face Hub's
(OUT/train-00000-of-00008.tar), with OUT/_index.json listing each shard's count and the classes.
Run it once per split.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from ssl_vit.config import DataConfig
from ssl_vit.data import build_dataset, write_shards

UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}


def parse_size(text: str) -> int:
    """'256MB' -> bytes (KB, MB, GB: powers of 1024; a bare number is bytes)."""
    text = text.strip().upper()
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="image folder or saved Hugging Face dataset")
    parser.add_argument("out", help="output folder (created if missing)")
    parser.add_argument("--split", default="train", help="split to write (default train)")
    parser.add_argument("--format", choices=("webdataset", "parquet"), default="webdataset")
    parser.add_argument("--max_size", default="256MB", help="image bytes per shard (256MB)")
    parser.add_argument("--max_count", type=int, default=0, help="images per shard (0: any)")
    parser.add_argument("--seed", type=int, default=0, help="of the sample order (0)")
    parser.add_argument("--keep_order", action="store_true", help="SRC's order, not shuffled")
    parser.add_argument("--image_column", default="image", help="of a Hugging Face dataset")
    parser.add_argument("--label_column", default="label", help="of a Hugging Face dataset")
    args = parser.parse_args(argv)
    data = DataConfig(
        path=args.src,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        max_bad_fraction=1.0,  # a bad image is copied as it is; training skips it
    )
    source = build_dataset(data, lambda image: {}).source
    files = write_shards(
        source,
        args.out,
        split=args.split,
        fmt=args.format,
        max_bytes=parse_size(args.max_size),
        max_count=args.max_count,
        seed=None if args.keep_order else args.seed,
    )
    print(json.dumps({"out": args.out, "shards": len(files), "images": sum(files.values())}))
    return files


if __name__ == "__main__":
    main()
