"""Shards: a dataset written as a few large files (WebDataset `.tar` or Parquet) that a stream
reads sequentially (data/streaming.py), instead of one file per image.

Layout written by `write_shards` (and `tools/make_shards.py`), the Hugging Face Hub's own naming,
so `datasets.load_dataset(DIR, streaming=True)` reads it too:

    DIR/train-00000-of-00004.tar (or .parquet)  ...  DIR/train-00003-of-00004.tar
    DIR/_index.json      {"format", "splits": {split: {"files": {name: count}, "classes": [...]}}}

A Parquet row is (image {"bytes", "path"}, label int64, id int64); a WebDataset sample is
KEY.EXT (the image file's own bytes, never re-encoded), KEY.cls (label) and KEY.json ({"id",
"path"}). `id` is the image's index in the source (its sorted order), so a stream's ids can be
checked against the dataset: disjoint across processes, none lost, none repeated.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ssl_vit.data.datasets import HFImages, ImageFiles, Source

INDEX = "_index.json"
"""Per split, each shard's file name and sample count, and the class names."""
FORMATS = {"webdataset": ".tar", "parquet": ".parquet"}


def raw_image(source: Source, i: int) -> tuple[bytes, str, int]:
    """(the encoded bytes, a file extension, label) of item i of an image folder or a Hugging
    Face dataset, as stored: nothing is decoded or re-encoded."""
    if isinstance(source, ImageFiles):
        path = source.files[i]
        return Path(path).read_bytes(), Path(path).suffix.lstrip(".").lower(), source.labels[i]
    if isinstance(source, HFImages):
        row = source.ds[i]
        obj = row[source.image_column]
        label = row[source.label_column] if source.label_column else None
        if isinstance(obj, dict) and obj.get("bytes") is not None:
            data = obj["bytes"]
        elif isinstance(obj, dict):
            data = Path(obj["path"]).read_bytes()
        else:
            raise TypeError(f"{source.path(i)}: no encoded image bytes ({type(obj).__name__})")
        with Image.open(io.BytesIO(data)) as im:  # the header only: the extension of the bytes
            ext = (im.format or "png").lower().replace("jpeg", "jpg")
        return data, ext, -1 if label is None else int(label)
    raise TypeError(f"cannot shard a {type(source).__name__}: an image folder or HF dataset only")


class ShardWriter:
    """Writes samples into numbered shards of at most `max_bytes` bytes (image bytes counted) and
    `max_count` samples (0: no limit); `close` names them SPLIT-IIIII-of-NNNNN and returns
    {file name: sample count}."""

    def __init__(self, out: Path, split: str, fmt: str, max_bytes: int, max_count: int = 0):
        self.out, self.split, self.fmt = out, split, fmt
        self.max_bytes, self.max_count = max_bytes, max_count
        self.counts: list[int] = []
        self.rows: list[dict[str, Any]] = []
        self.tar: tarfile.TarFile | None = None
        self.size = 0

    def _name(self, k: int) -> Path:
        return self.out / f"{self.split}-{k:05d}{FORMATS[self.fmt]}.tmp"

    def add(self, data: bytes, ext: str, label: int, index: int, path: str) -> None:
        full = self.counts and (
            self.size + len(data) > self.max_bytes
            or (self.max_count and self.counts[-1] >= self.max_count)
        )
        if not self.counts or (full and self.counts[-1]):
            self._flush()
            self.counts.append(0)
            self.size = 0
            if self.fmt == "webdataset":
                self.tar = tarfile.open(self._name(len(self.counts) - 1), "w")
        key = f"{index:09d}"
        if self.fmt == "webdataset":
            meta = json.dumps({"id": index, "path": path}).encode()
            for name, blob in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                self._member(name, blob)
            self._member(f"{key}.json", meta)
        else:
            self.rows.append({"image": {"bytes": data, "path": path}, "label": label, "id": index})
        self.size += len(data)
        self.counts[-1] += 1

    def _member(self, name: str, blob: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(blob), 0o644
        self.tar.addfile(info, io.BytesIO(blob))

    def _flush(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None
        if self.rows:
            import pyarrow as pa
            import pyarrow.parquet as pq

            image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            schema = pa.schema([("image", image), ("label", pa.int64()), ("id", pa.int64())])
            table = pa.Table.from_pylist(self.rows, schema=schema)
            pq.write_table(table, self._name(len(self.counts) - 1), row_group_size=256)
            self.rows = []

    def close(self) -> dict[str, int]:
        self._flush()
        n, names = len(self.counts), {}
        for k, count in enumerate(self.counts):
            final = self.out / f"{self.split}-{k:05d}-of-{n:05d}{FORMATS[self.fmt]}"
            os.replace(self._name(k), final)
            names[final.name] = count
        return names


def write_shards(
    source: Source,
    out: str | Path,
    *,
    split: str = "train",
    fmt: str = "webdataset",
    max_bytes: int = 256 << 20,
    max_count: int = 0,
    seed: int | None = 0,
    progress: bool = True,
) -> dict[str, int]:
    """Write every image of `source` (an image folder's or a Hugging Face dataset's) as shards of
    `fmt` into `out`, and record them in out/_index.json. The images go in an order drawn from
    `seed` (None: the source's, often sorted by class): a stream shuffles only within windows.

    Returns {shard file name: sample count}. Shards hold at most `max_bytes` of image bytes and
    `max_count` samples (0: no count limit), except a single image larger than max_bytes.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: one of {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, split, fmt, max_bytes, max_count)
    order = (
        range(len(source)) if seed is None else np.random.default_rng(seed).permutation(len(source))
    )
    for i in tqdm(order, desc=f"shards {split}", unit="img", disable=not progress):
        i = int(i)
        data, ext, label = raw_image(source, i)
        writer.add(data, ext, label, i, source.path(i))
    files = writer.close()
    index_file = out / INDEX
    index = json.loads(index_file.read_text()) if index_file.is_file() else {"splits": {}}
    index["format"] = fmt
    index["splits"][split] = {"files": files, "classes": list(source.classes)}
    index_file.write_text(json.dumps(index, indent=1))
    return files


def read_index(root: Path) -> dict[str, Any]:
    """The _index.json of a shard folder ({} when there is none)."""
    f = root / INDEX
    return json.loads(f.read_text()) if f.is_file() else {}


def tar_samples(path: Path) -> Iterator[str]:
    """The sample keys of a WebDataset tar, in order, read from its headers (no data read)."""
    last = None
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                key = member.name.split("/")[-1].split(".")[0]
                if key != last:
                    yield key
                    last = key
