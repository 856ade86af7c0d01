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

Read back by position (`ShardCursor`): a reader starts at any sample of a shard, passing over
the ones before by their tar headers or Parquet row groups; a shard that fails or ends early gives
`Lost` samples naming it instead of stopping the run.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

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


class Lost(NamedTuple):
    """A sample a damaged shard could not give (the shard, from which sample, and why): skipped
    and counted like an unreadable image."""

    where: str


def split_key(name: str) -> tuple[str, str]:
    """WebDataset member name -> (sample key, extension): the key is the path up to the first dot
    of the file name ("d/000000005.seg.png" -> ("d/000000005", "seg.png"))."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return f"{folder}/{stem}" if folder else stem, ext.lower()


DECODE = {"json": json.loads, "cls": int, "cls2": int, "index": int, "inx": int, "id": int}
"""WebDataset fields decoded from their text, as `datasets`' webdataset builder does; images and
every other field stay bytes."""


def tar_ends_whole(path: Path) -> bool:
    """Whether a tar ends as a written one does (whole 512-byte blocks, the last two zero): one
    small read; a truncated tar does not."""
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


def tar_complete_samples(path: Path) -> int:
    """Samples of a WebDataset tar whose every member lies inside the file, read from the headers
    (no data read): all of a whole tar's, the readable ones of a truncated tar's (its last sample
    left out when it lacks a field of the first)."""
    size, keys = path.stat().st_size, []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    key, ext = split_key(member.name)
                    if member.offset_data + member.size > size:
                        break
                    if not keys or keys[-1][0] != key:
                        keys.append((key, set()))
                    keys[-1][1].add(ext)
    except (tarfile.TarError, OSError, EOFError):
        pass  # a truncated header: the samples before it
    if keys and keys[-1][1] != keys[0][1]:
        keys.pop()
    return len(keys)


def _tar_from(path: str, start: int) -> Iterator[dict[str, Any]]:
    """The WebDataset samples of a tar from its sample `start` on ({"__key__", "__url__",
    field: value}); the samples before are passed over by their headers."""
    with tarfile.open(path) as tar:
        sample: dict[str, Any] = {}
        n = -1
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_key(member.name)
            if key != sample.get("__key__"):
                if sample and n >= start:
                    yield sample
                sample, n = {"__key__": key, "__url__": path}, n + 1
            if n >= start:
                data = tar.extractfile(member).read()
                sample[ext] = DECODE[ext](data) if ext in DECODE else data
        if sample and n >= start:
            yield sample


def _parquet_from(path: str, start: int) -> Iterator[dict[str, Any]]:
    """The rows of a Parquet file from row `start` on; the row groups before are not read."""
    import pyarrow.parquet as pq

    shard, first = pq.ParquetFile(path), 0
    for g in range(shard.num_row_groups):
        rows = shard.metadata.row_group(g).num_rows
        if first + rows > start:
            yield from shard.read_row_group(g).slice(max(0, start - first)).to_pylist()
        first += rows


def shard_samples(path: str, start: int) -> Iterator[dict[str, Any] | Lost]:
    """The samples of a shard from sample `start` on, then `Lost` ones without end: a shard that
    fails while read (truncated, damaged) or ends before the sample asked for names itself in
    them instead of stopping the run."""
    import pyarrow as pa

    n, why = start, "it has no more samples"
    read = _parquet_from if path.endswith(FORMATS["parquet"]) else _tar_from
    samples = read(path, start)
    while True:
        try:  # not around the yield: closing the generator must not pass through it
            sample = next(samples)
        except StopIteration:
            break
        except (tarfile.TarError, OSError, EOFError, pa.ArrowException) as e:
            why = f"{type(e).__name__}: {e}"
            break
        yield sample
        n += 1
    lost = Lost(f"{path}: damaged shard, its samples from #{n} on are unreadable ({why})")
    while True:
        yield lost


class ShardCursor:
    """Reads samples of shards by position, front to back: a read that starts where the last one
    stopped goes on in the open file; any other re-opens the shard and passes over what is
    before (tar headers, Parquet row groups)."""

    def __init__(self) -> None:
        self.path, self.at = "", -1
        self.samples: Iterator[dict[str, Any] | Lost] = iter(())

    def take(self, path: str, start: int, count: int) -> list[dict[str, Any] | Lost]:
        """Samples start..start+count-1 of shard `path` (`Lost` ones where it fails)."""
        if (path, start) != (self.path, self.at):
            self.samples = shard_samples(path, start)
        self.path, self.at = path, start + count
        return list(itertools.islice(self.samples, count))
