"""Streams: a dataset read sequentially from shards (data.streaming), on Hugging Face `datasets`'
`IterableDataset` (its webdataset and parquet streaming builders, `split_dataset_by_node`, the
shuffle buffer, `state_dict()` / `load_state_dict()`), which the project depends on already.

What this module adds to it, for the training loop:

* epochs of a fixed number of batches on every process (`StreamLoader`): the fewest samples any
  process can be given (shards are dealt whole, in a per-epoch shuffled order, round-robin to
  the processes); a process whose stream still runs dry (workers' dropped partial batches,
  unreadable images) makes up the count from the epoch's start, so none waits forever;
* the same item contract as `ImageDataset`: the method's view, "labels", "index" (the sample's
  id: make_shards' source index), "skipped" (an unreadable image is skipped and reported by the
  next readable item); the augmentation is a function of (seed, epoch, id); with
  data.decode_on_device the item holds the image's bytes ("encoded") for the device view;
* shuffling within windows of data.shuffle_buffer samples (on top of the shard order, shuffled
  per epoch) rather than through a sliding buffer: a position in a window is cheap to save;
* resume: every item carries its loader worker's position after it, so the training process
  knows each worker's position at the last batch it consumed (`StreamLoader.state_dict`, JSON);
  a resumed worker re-reads the one window it was in and continues: no sample repeats or is lost
  (with the same data.num_workers; another count restarts the epoch).
"""

from __future__ import annotations

import itertools
import logging
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssl_vit.config import DataConfig
from ssl_vit.data.datasets import MAX_TRIES, DataError, collate, open_image, seeded
from ssl_vit.data.device.encoded import bytes_tensor
from ssl_vit.data.encoded_batch import Encoded
from ssl_vit.data.shards import FORMATS, read_index, tar_samples

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")
"""WebDataset extensions of an image (a sample's first one present is its image)."""


def shard_files(root: Path, split: str) -> list[Path]:
    """The shards of `split` under `root`, sorted: .tar or .parquet files in a folder named
    `split` or named `split`-*, anywhere below root (the Hub's data/train-00000-of-00004.parquet
    layout included). DataError when there are none, or when both formats are mixed."""
    found = sorted(
        f
        for f in root.rglob("*")
        if f.is_file()
        and f.suffix in FORMATS.values()
        and not any(p.startswith(".") for p in f.relative_to(root).parts)
        and (split in f.relative_to(root).parts[:-1] or f.name.startswith(f"{split}-"))
    )
    if not found:
        raise DataError(
            f"data.path {root}: no .tar or .parquet shards of split {split!r} (files named "
            f"{split}-*, or in a folder {split}/); write some with tools/make_shards.py"
        )
    if len({f.suffix for f in found}) > 1:
        raise DataError(f"data.path {root}: split {split!r} mixes .tar and .parquet shards")
    return found


def shard_counts(root: Path, files: list[Path], split: str) -> list[int]:
    """Samples per shard: from make_shards' _index.json, Parquet footers, or tar headers."""
    listed = read_index(root).get("splits", {}).get(split, {}).get("files", {})
    counts = []
    for f in files:
        if f.name in listed and f.parent == root:
            counts.append(int(listed[f.name]))
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            counts.append(pq.ParquetFile(f).metadata.num_rows)
        else:
            counts.append(sum(1 for _ in tar_samples(f)))
    return counts


def samples_per_process(counts: list[int] | None, processes: int) -> int | None:
    """The fewest samples a process can be given in an epoch: shards dealt round-robin from a
    shuffled order when their count divides by the processes (then the sum of the smallest
    len / processes), else every processes-th sample of every shard. None when unknown."""
    if counts is None:
        return None
    if len(counts) % processes == 0:
        return sum(sorted(counts)[: len(counts) // processes])
    return sum(counts) // processes


def _id(example: dict[str, Any], image: Any) -> int:
    """A sample's id: its "id" column (make_shards), its WebDataset json's "id", else a CRC32 of
    its key and shard (or of its bytes)."""
    if isinstance(example.get("id"), int):
        return example["id"]
    meta = example.get("json")
    if isinstance(meta, dict) and isinstance(meta.get("id"), int):
        return meta["id"]
    if example.get("__key__") is not None:
        return zlib.crc32(f"{example.get('__url__')}/{example['__key__']}".encode())
    data = image.get("bytes") if isinstance(image, dict) else image
    return zlib.crc32(data) if isinstance(data, bytes) else -1


def _where(example: dict[str, Any], image: Any) -> str:
    """Where a sample comes from, for skip logs."""
    if example.get("__key__") is not None:
        return f"{example.get('__url__')}:{example['__key__']}"
    if isinstance(image, dict) and image.get("path"):
        return str(image["path"])
    return f"id {_id(example, image)}"


class Reader:
    """The Hugging Face `IterableDataset` this process reads in an epoch (picklable, so loader
    workers can be handed it): the shard files in an order shuffled by (seed, epoch), their
    images left encoded, split across processes by `split_dataset_by_node` (whole shards when
    their count divides by the processes, else every processes-th sample). A Hub dataset
    (`hub`) is read in its own shard order."""

    def __init__(
        self, builder: str, files: list[str], hub: str, split: str, rank: int, processes: int
    ):
        self.builder, self.files, self.hub, self.split = builder, files, hub, split
        self.rank, self.processes = rank, processes

    def __call__(self, seed: int, epoch: int) -> Any:
        import datasets
        from datasets.distributed import split_dataset_by_node

        if self.hub:
            ds = datasets.load_dataset(self.hub, split=self.split, streaming=True)
        else:
            order = np.random.default_rng([seed, epoch]).permutation(len(self.files))
            files = [self.files[i] for i in order]
            ds = datasets.load_dataset(
                self.builder, data_files=files, split="train", streaming=True
            )
        for column, feature in (ds.features or {}).items():  # decoded by ImageStream
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(column, datasets.Image(decode=False))
        return split_dataset_by_node(ds, rank=self.rank, world_size=self.processes)


class ImageStream(IterableDataset):
    """This process's part of a stream through a `view`: items as `ImageDataset`'s ({view
    fields..., "labels", "index", "skipped"}) plus "stream": (loader worker id, the worker's
    reader state after this item).

    Each loader worker reads its share of the process's shards (`datasets` deals them), shuffled
    within windows of `buffer` samples. `states` ({worker id: position}, from
    `StreamLoader.load_state_dict`) restart each worker just after the item of it the training
    process last consumed.
    """

    def __init__(
        self,
        reader: Reader,
        view: Callable[[Any], dict[str, Any]],
        *,
        seed: int,
        buffer: int,
        image_column: str,
        label_column: str,
        classes: list[str],
        size: int | None,
        encoded: bool = False,
    ):
        self.reader, self.view, self.seed, self.buffer = reader, view, seed, buffer
        self.encoded = encoded
        self.image_column, self.label_column = image_column, label_column
        self.classes, self.size = classes, size
        self.epoch = 0
        self.states: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        """Samples of the whole dataset (every process's), when counted; else 0."""
        return self.size or 0

    def set_epoch(self, epoch: int) -> None:
        """The shard order, shuffle buffer and augmentation of `epoch`."""
        self.epoch = epoch

    def _image(self, example: dict[str, Any]) -> Any:
        if example.get(self.image_column) is not None:
            return example[self.image_column]
        return next((example[k] for k in IMAGE_KEYS if example.get(k) is not None), None)

    def _label(self, example: dict[str, Any]) -> int:
        label = example.get(self.label_column) if self.label_column else None
        label = example.get("cls") if label is None else label
        return -1 if label is None else int(label)

    def _shuffled(self, worker: int) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(example, this worker's position after it): the worker's examples shuffled within
        consecutive windows of `buffer` samples, each by a generator of (seed, epoch, rank,
        worker, window). A position is the reader's state at its window's start, the window's
        number and how many of it were taken: a resume re-reads that one window (encoded, not
        decoded) and skips what was taken, so it neither repeats nor loses a sample."""
        ds = self.reader(self.seed, self.epoch)
        saved = self.states.get(worker, {"reader": None, "window": 0, "taken": 0})
        at, window, taken = saved["reader"], saved["window"], saved["taken"]
        if at is not None:
            ds.load_state_dict(at)
        examples = iter(ds)
        while block := list(itertools.islice(examples, max(1, self.buffer))):
            rng = np.random.default_rng([self.seed, self.epoch, self.reader.rank, worker, window])
            order = rng.permutation(len(block))
            for j in range(taken, len(block)):
                yield block[order[j]], {"reader": at, "window": window, "taken": j + 1}
            at, window, taken = ds.state_dict(), window + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        failed: list[str] = []
        for example, state in self._shuffled(worker):
            image = self._image(example)
            try:
                decoded = bytes_tensor(image) if self.encoded else open_image(image)
                if self.encoded and not decoded.numel():
                    raise DataError("empty")
            except Exception:  # PIL's many error types, as in ImageDataset.__getitem__
                failed.append(_where(example, image))
                if len(failed) >= MAX_TRIES:
                    raise DataError(
                        f"{len(failed)} consecutive images could not be read, {failed[0]} to "
                        f"{failed[-1]}: part of the dataset is damaged; check data.path"
                    ) from None
                continue
            index = _id(example, image)
            if self.encoded:  # decoded and augmented on the device (data.decode_on_device)
                out = {"encoded": Encoded(decoded, _where(example, image))}
            else:
                with seeded(self.seed, self.epoch, index & 0xFFFFFFFF):
                    out = self.view(decoded)
            label, stream = self._label(example), (worker, state)
            yield {**out, "labels": label, "index": index, "skipped": failed, "stream": stream}
            failed = []


def stream_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`collate`, plus "stream": the (worker, state) after the batch's last item (a batch comes
    from one loader worker)."""
    streams = [it.pop("stream") for it in items]
    batch = collate(items)
    batch["stream"] = streams[-1]
    return batch


class StreamLoader:
    """The loader of a stream on one process: epochs of `batches` batches (the same count on
    every process), its position saved and restored as JSON.

    Not passed to `accelerator.prepare`, which would read the stream on one process and send
    batches to the others: every process reads its own shards (split_dataset_by_node), and the
    caller moves batches to the device.
    """

    def __init__(self, dataset: ImageStream, loader: DataLoader, batches: int):
        self.dataset, self.loader, self.batches = dataset, loader, batches
        self.epoch = 0
        self.positions: dict[int, dict[str, Any]] = {}
        """{loader worker: its stream state after the last batch consumed}, this epoch."""

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.positions = {}
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def iterate(self, start: int) -> Iterator[dict[str, Any]]:
        """Batches start..batches-1 of the epoch; from the saved positions when start > 0."""
        self.dataset.states = dict(self.positions) if start else {}
        if not start:
            self.positions = {}
        for batch in itertools.islice(self._passes(start), self.batches - start):
            worker, state = batch.pop("stream")
            self.positions[worker] = state
            yield batch

    def _passes(self, start: int) -> Iterator[dict[str, Any]]:
        """The loader's batches; should this process's stream run dry before the epoch's batch
        count (workers' partial last batches dropped, unreadable images), the epoch's stream
        again from its start, so that every process takes the same number of batches (a process
        that stopped early would leave the others waiting)."""
        n = start
        while True:
            before = n
            for batch in self.loader:
                n += 1
                yield batch
            if n == before:
                raise DataError(f"the stream of epoch {self.epoch} yields no batch")
            logger.warning(
                "the stream ran dry after %d of its %d batches in epoch %d: the rest of the "
                "epoch repeats samples from its start",
                n,
                self.batches,
                self.epoch,
            )
            self.dataset.states = {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: the epoch, and each worker's stream state ({} at an epoch's start)."""
        workers = {str(w): s for w, s in self.positions.items()}
        return {"epoch": self.epoch, "num_workers": self.loader.num_workers, "workers": workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_workers"] != self.loader.num_workers:
            logger.warning(  # allowed by train.resume_changes (run_dir.check_config)
                "the stream was saved with %d loader workers, now %d: its epoch %d restarts from "
                "its beginning (its samples seen so far repeat)",
                state["num_workers"],
                self.loader.num_workers,
                state["epoch"],
            )
            self.positions = {}
        else:
            self.positions = {int(w): s for w, s in state["workers"].items()}
        self.epoch = state["epoch"]
        self.dataset.set_epoch(self.epoch)


def open_stream(data_cfg: DataConfig, split: str) -> tuple[Any, list[int] | None, list[str], str]:
    """(its Reader for process 0 of 1, samples per shard or None, class names, where) of
    data.path as a stream."""
    import datasets

    path = data_cfg.path
    if path.startswith("hf:"):
        try:
            builder = datasets.load_dataset_builder(path[3:])
        except Exception as e:  # offline, unknown, gated: many error types
            raise DataError(f"{path}: cannot stream it ({type(e).__name__}: {e})") from None
        splits = builder.info.splits or {}
        if split not in splits:
            raise DataError(f"{path}: no split {split!r}; its splits: {list(splits)}")
        n = splits[split].num_examples
        feature = (builder.info.features or {}).get(data_cfg.label_column)
        classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else []
        return Reader("", [], path[3:], split, 0, 1), [n] if n else None, classes, path
    root = Path(path)
    files = shard_files(root, split)
    builder = "parquet" if files[0].suffix == ".parquet" else "webdataset"
    reader = Reader(builder, [str(f) for f in files], "", split, 0, 1)
    classes = read_index(root).get("splits", {}).get(split, {}).get("classes", [])
    if not classes and builder == "parquet":  # e.g. a Hub repository's files, downloaded
        classes = parquet_classes(files[0], data_cfg.label_column)
    return reader, shard_counts(root, files, split), classes, str(root)


def parquet_classes(path: Path, label_column: str) -> list[str]:
    """The class names a Parquet file's schema gives `label_column` (a `datasets` ClassLabel,
    which to_parquet and the Hub keep in the schema's metadata); [] when it gives none."""
    import datasets
    import pyarrow.parquet as pq

    feature = datasets.Features.from_arrow_schema(pq.read_schema(path)).get(label_column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else []


def stream_classes(data_cfg: DataConfig) -> list[str]:
    """The class names of a stream's training split, from its metadata ([] when unlabeled)."""
    return open_stream(data_cfg, data_cfg.split)[2]


def build_stream(
    data_cfg: DataConfig,
    view: Callable[[Any], dict[str, Any]],
    *,
    batch_size: int,
    seed: int,
    rank: int,
    processes: int,
    split: str | None = None,
) -> StreamLoader:
    """This process's stream of data.path through `view`: its shards, shuffled by
    data.shuffle_buffer, in epochs of the same number of batches on every process
    (data.samples_per_epoch, or the fewest samples a process is dealt)."""
    split = split or data_cfg.split
    reader, counts, classes, where = open_stream(data_cfg, split)
    reader.rank, reader.processes = rank, processes
    per_process = samples_per_process(counts, processes)
    if data_cfg.samples_per_epoch:
        wanted = data_cfg.samples_per_epoch // processes
        per_process = min(wanted, per_process) if per_process is not None else wanted
    if per_process is None:
        raise DataError(
            f"data.path {where}: the stream's size is unknown; set data.samples_per_epoch"
        )
    n_shards = len(counts) if counts and not reader.hub else 0
    shards_here = n_shards // processes if n_shards % processes == 0 else n_shards
    if n_shards and data_cfg.num_workers > shards_here:
        raise DataError(
            f"data.num_workers {data_cfg.num_workers}: more loader workers than the "
            f"{shards_here} shards each of the {processes} process(es) reads; lower it or write "
            "more shards (tools/make_shards.py --max_count)"
        )
    size = sum(counts) if counts else None
    dataset = ImageStream(
        reader,
        view,
        seed=seed,
        buffer=data_cfg.shuffle_buffer,
        image_column=data_cfg.image_column,
        label_column=data_cfg.label_column,
        classes=classes,
        size=size,
        encoded=data_cfg.decode_on_device,
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        drop_last=True,
        num_workers=data_cfg.num_workers,
        pin_memory=data_cfg.pin_memory and torch.cuda.is_available(),
        collate_fn=stream_collate,
        persistent_workers=False,
        timeout=data_cfg.timeout if data_cfg.num_workers else 0,
    )
    logger.info(
        "streaming %s: %s samples in %s shards; %d per process and epoch (%d processes)",
        where,
        size if size is not None else "?",
        n_shards or "?",
        per_process,
        processes,
    )
    return StreamLoader(dataset, loader, per_process // batch_size)
