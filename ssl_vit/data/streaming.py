"""Streams: a dataset read sequentially from shards (data.streaming): make_shards' WebDataset
`.tar` or Parquet files, a Hugging Face dataset repository on disk, or `hf:NAME` from the Hub.

What this module gives the training loop:

* **an epoch dealt by samples, not only by shards** (`Deal`): the shards in an order drawn from
  (seed, epoch), rotated by a drawn offset, make one sequence of the epoch's T samples. Process
  p reads the N at p × N, N the most whole global batches that fit (T // (P × B) × B, or
  data.samples_per_epoch's share), and its loader workers split them into consecutive runs of
  whole batches: every process yields the same number of batches, no sample twice. The
  T − P × N after them (fewer than a global batch P × B, unless data.samples_per_epoch asks for
  fewer) are the epoch's remainder, counted in its summary; another epoch leaves others over;
* **made-up samples**: the remainder is dealt too, as the workers' reserves. An unreadable image
  or a damaged shard's sample is skipped (named, counted) and made up from the worker's reserve;
  only a worker whose reserve is spent repeats samples of its own run, counted ("repeated" in the
  epoch summary and the run's metrics);
* **damaged shards**: a tar that does not end as a tar does is counted from its headers when the
  stream is built (its readable samples are dealt; the others, named, count as skipped images in
  every epoch); a shard that fails while read loses the rest of its samples the same way; a
  Parquet file whose footer cannot be read is an error naming it;
* the item contract of `ImageDataset`: the method's view, "labels", "index" (the sample's id:
  make_shards' source index), "skipped" (unreadable samples reported by the next readable item);
  the augmentation is a function of (seed, epoch, id); with data.decode_on_device the item holds
  the image's bytes ("encoded") for the device view;
* **shuffling** within windows of data.shuffle_buffer samples of a worker's run (on top of the
  shard order): a position in a window is cheap to save;
* **resume**: every item carries its loader worker's position after it (its window's start and
  size, how many of the window it took, its items so far): a function of the deal, so a
  checkpoint holds these and the settings the deal is drawn from (`StreamLoader.state_dict`,
  JSON). A resumed worker re-reads its one window and goes on: no sample repeats or is lost, also
  with another data.shuffle_buffer (the window is finished at its saved size, the next ones take
  the new one). Resumed with other deal settings (data.num_workers, train.batch_size,
  train.seed, data.samples_per_epoch, the processes, the shards), the epoch's order restarts
  from its beginning, logged.

Local shards are read here (tarfile, pyarrow): `datasets`' IterableDataset deals whole shards to
loader workers and cannot start one mid-shard. `hf:NAME` is read through it (its streaming
builder, `split_dataset_by_node`, `state_dict()`), whole shards per process and worker; a process
whose Hub stream runs dry first repeats samples from the epoch's start, counted.
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
from ssl_vit.data.datasets import (
    MAX_TRIES,
    DataError,
    collate,
    open_image,
    own_process_group,
    seeded,
)
from ssl_vit.data.device.encoded import bytes_tensor
from ssl_vit.data.encoded_batch import Encoded
from ssl_vit.data.shards import (
    FORMATS,
    Lost,
    ShardCursor,
    read_index,
    tar_complete_samples,
    tar_ends_whole,
)

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")
"""WebDataset extensions of an image (a sample's first one present is its image)."""
START = {"at": 0, "size": 0, "taken": 0, "given": 0}
"""A loader worker's position at its epoch's start: where its window starts in its sequence, the
window's size (0: none yet), the samples of it taken, the items given."""


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


def check_shards(
    root: Path, files: list[Path], split: str
) -> tuple[list[int], list[tuple[str, int]]]:
    """(readable samples per shard, [(where, samples lost)] of damaged ones). Counts come from
    make_shards' _index.json, else tar headers; a Parquet footer is read (an unreadable one is a
    DataError naming the file); a tar that does not end as a tar does (truncated) is counted from
    its headers, and what it lost against the index is named, to be counted as skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    listed = read_index(root).get("splits", {}).get(split, {}).get("files", {})
    counts, lost = [], []
    for f in files:
        declared = int(listed[f.name]) if f.name in listed and f.parent == root else None
        if f.suffix == FORMATS["parquet"]:
            try:
                n = pq.read_metadata(f).num_rows
            except (pa.ArrowException, OSError) as e:
                raise DataError(
                    f"data.path {root}: shard {f.name} is not a readable Parquet file "
                    f"({type(e).__name__}: {e}); write it again (tools/make_shards.py) or move it "
                    "out of data.path"
                ) from None
        elif tar_ends_whole(f):
            n = declared if declared is not None else tar_complete_samples(f)
        else:
            n = tar_complete_samples(f)
            logger.warning(
                "%s: truncated or damaged shard (it does not end as a tar does): %d of its %s "
                "samples are readable%s",
                f,
                n,
                declared if declared is not None else "?",
                "; the others count as skipped images in every epoch" if declared else "",
            )
        if declared is not None and n < declared:
            why = f"{declared - n} of its {declared} samples unreadable"
            lost.append((f"{f}: damaged shard, {why}", declared - n))
        counts.append(n)
    return counts, lost


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


class Deal:
    """Which samples of an epoch each process and loader worker reads, as positions in the
    epoch's sequence: the shards in an order drawn from (seed, epoch), rotated by an offset drawn
    with it. Process p reads the `per_process` at p × per_process, its workers consecutive runs
    of whole batches of them; the remainder after the processes' samples is dealt as the
    workers' reserves."""

    def __init__(
        self,
        files: list[str],
        counts: list[int],
        *,
        processes: int,
        batch_size: int,
        per_process: int,
        seed: int,
    ):
        self.files, self.counts, self.seed = files, counts, seed
        self.processes, self.batch_size, self.per_process = processes, batch_size, per_process
        self.total = sum(counts)
        self.remainder = self.total - processes * per_process

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(shard order, the first position of each shard in it and the total, rotation)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.files))
        starts = np.concatenate([[0], np.cumsum(np.asarray(self.counts)[order])])
        return order, starts, int(rng.integers(self.total))

    def share(self, rank: int, worker: int, workers: int) -> tuple[int, int, int, int]:
        """(first position, samples) of the worker's run of whole batches, and of its reserve."""
        b, batches = self.batch_size, self.per_process // self.batch_size
        each, extra = divmod(batches, workers)
        start = rank * self.per_process + (worker * each + min(worker, extra)) * b
        slots, slot = self.processes * workers, rank * workers + worker
        lo, hi = (self.remainder * s // slots for s in (slot, slot + 1))
        return start, (each + (worker < extra)) * b, self.total - self.remainder + lo, hi - lo

    def pieces(self, epoch: int, position: int, count: int) -> Iterator[tuple[str, int, int]]:
        """(shard file, its first sample, samples) of `count` positions from `position` on."""
        order, starts, rotation = self.layout(epoch)
        at = (position + rotation) % self.total
        while count:
            s = int(np.searchsorted(starts, at, "right")) - 1
            n = min(count, int(starts[s + 1]) - at)
            yield self.files[order[s]], at - int(starts[s]), n
            count, at = count - n, (at + n) % self.total


class ShardSource:
    """Local shards, as one process's loader workers read them: each its share of the `Deal`."""

    def __init__(self, deal: Deal, rank: int, buffer: int, seed: int):
        self.deal, self.rank, self.buffer, self.seed = deal, rank, buffer, seed

    def quota(self, worker: int, workers: int) -> int | None:
        """The items the worker gives in an epoch: its run."""
        return self.deal.share(self.rank, worker, workers)[1]

    def span(self, worker: int, workers: int) -> int:
        """The samples the worker may read before it repeats one: its run and its reserve."""
        _, run, _, spares = self.deal.share(self.rank, worker, workers)
        return run + spares

    def unread(self, workers: int, positions: dict[int, dict[str, Any]]) -> int:
        """The samples of this process's reserves left unread, its workers at `positions`."""
        left = 0
        for w in range(workers):
            _, run, _, spares = self.deal.share(self.rank, w, workers)
            at = positions.get(w, START)
            left += spares - max(0, min(spares, at["at"] - run + at["taken"]))
        return left

    def samples(
        self, epoch: int, worker: int, workers: int, saved: dict[str, Any]
    ) -> Iterator[tuple[dict[str, Any] | Lost, dict[str, Any], str]]:
        """(sample, the worker's position after it, "run" | "spare" | "repeat") from position
        `saved` on: its run in windows of `buffer` samples, each shuffled by a generator of
        (seed, epoch, rank, worker, the window's start); then one at a time its reserve's
        samples, then its run's again (repeats), for as long as the worker asks (it stops at its
        quota). A saved window is finished at its saved size, so a resume with another buffer
        goes on exactly."""
        start, run, spare_at, spares = self.deal.share(self.rank, worker, workers)
        if not run:
            return
        cursor = ShardCursor()
        at, size, taken = saved["at"], saved["size"], saved["taken"]
        while True:
            if not size:
                size = min(max(1, self.buffer), run - at) if at < run else 1
            if at < run:
                position, kind = start + at, "run"
            elif at - run < spares:
                position, kind = spare_at + at - run, "spare"
            else:
                position, kind = start + (at - run - spares) % run, "repeat"
            pieces = self.deal.pieces(epoch, position, size)
            block = [s for f, i, c in pieces for s in cursor.take(f, i, c)]
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker, at])
            order = rng.permutation(size)
            for j in range(taken, size):
                yield block[order[j]], {"at": at, "size": size, "taken": j + 1}, kind
            at, size, taken = at + size, 0, 0


class HubSource:
    """A Hub dataset (hf:NAME) through `datasets`' streaming IterableDataset, split across the
    processes by `split_dataset_by_node` and across a process's loader workers by `datasets`
    (whole shards), in windows of `buffer` samples; a position holds the reader's state at its
    window's start."""

    def __init__(self, name: str, split: str, rank: int, processes: int, buffer: int, seed: int):
        self.name, self.split, self.rank, self.processes = name, split, rank, processes
        self.buffer, self.seed = buffer, seed

    def quota(self, worker: int, workers: int) -> int | None:
        return None  # the samples datasets deals a worker are not known ahead

    def span(self, worker: int, workers: int) -> int:
        return 0

    def unread(self, workers: int, positions: dict[int, dict[str, Any]]) -> int | None:
        return None

    def samples(
        self, epoch: int, worker: int, workers: int, saved: dict[str, Any]
    ) -> Iterator[tuple[dict[str, Any], dict[str, Any], str]]:
        """As `ShardSource.samples`, without a reserve: a worker reads what `datasets` deals it."""
        import datasets
        from datasets.distributed import split_dataset_by_node

        ds = datasets.load_dataset(self.name, split=self.split, streaming=True)
        for column, feature in (ds.features or {}).items():  # decoded by ImageStream
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(column, datasets.Image(decode=False))
        ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.processes)
        reader, at, size, taken = saved.get("reader"), saved["at"], saved["size"], saved["taken"]
        if reader is not None:
            ds.load_state_dict(reader)
        examples = iter(ds)
        while block := list(itertools.islice(examples, size or max(1, self.buffer))):
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker, at])
            order = rng.permutation(len(block))
            for j in range(taken, len(block)):
                position = {"reader": reader, "at": at, "size": len(block), "taken": j + 1}
                yield block[order[j]], position, "run"
            reader, at, size, taken = ds.state_dict(), at + len(block), 0, 0


class ImageStream(IterableDataset):
    """This process's part of a stream through a `view`: items as `ImageDataset`'s ({view
    fields..., "labels", "index", "skipped"}) plus "stream": (loader worker id, its position
    after this item), "repeat" and "spare" (whether it repeats a sample of the epoch, or makes
    up for a skipped one from the remainder).

    Each loader worker reads its share of the `source` and stops at its quota; `states`
    ({worker id: position}, from `StreamLoader.load_state_dict`) restart each worker just after
    the item of it the training process last consumed.
    """

    def __init__(
        self,
        source: ShardSource | HubSource,
        view: Callable[[Any], dict[str, Any]],
        *,
        seed: int,
        image_column: str,
        label_column: str,
        classes: list[str],
        size: int | None,
        encoded: bool = False,
    ):
        self.source, self.view, self.seed, self.encoded = source, view, seed, encoded
        self.image_column, self.label_column = image_column, label_column
        self.classes, self.size = classes, size
        self.epoch = 0
        self.states: dict[int, dict[str, Any]] = {}
        self.rotate = 0
        """Which worker's share the loader's worker 0 reads: a loader starts its round-robin at
        worker 0, so a resume at batch n rotates the shares by n (mod workers) for its batches
        to come in the order the uninterrupted run read them."""

    def __len__(self) -> int:
        """Samples of the whole dataset (every process's), when counted; else 0."""
        return self.size or 0

    def set_epoch(self, epoch: int) -> None:
        """The shard order, shuffle and augmentation of `epoch`."""
        self.epoch = epoch

    def _image(self, example: dict[str, Any]) -> Any:
        if example.get(self.image_column) is not None:
            return example[self.image_column]
        return next((example[k] for k in IMAGE_KEYS if example.get(k) is not None), None)

    def _label(self, example: dict[str, Any]) -> int:
        label = example.get(self.label_column) if self.label_column else None
        label = example.get("cls") if label is None else label
        return -1 if label is None else int(label)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (worker + self.rotate) % workers  # the loader's first worker reads the next batch
        quota = self.source.quota(worker, workers)
        at = self.states.get(worker, START)
        given = at["given"]
        # a worker that reads its run and reserve without one readable sample would go on forever
        limit = self.source.span(worker, workers) + MAX_TRIES
        failed: list[str] = []
        bad = 0  # consecutive images that did not decode
        if quota is not None and given >= quota:
            return
        for example, position, kind in self.source.samples(self.epoch, worker, workers, at):
            if isinstance(example, Lost):  # a damaged shard's: skipped, counted, made up
                failed.append(example.where)
                if quota is not None and len(failed) >= limit:
                    raise DataError(
                        f"no sample of loader worker {worker} of process {self.source.rank} can "
                        f"be read, {failed[0]} to {failed[-1]}; check data.path"
                    )
                continue
            image = self._image(example)
            try:
                decoded = bytes_tensor(image) if self.encoded else open_image(image)
                if self.encoded and not decoded.numel():
                    raise DataError("empty")
            except Exception:  # PIL's many error types, as in ImageDataset.__getitem__
                failed.append(_where(example, image))
                bad += 1
                if bad >= MAX_TRIES:
                    raise DataError(
                        f"{bad} consecutive images could not be read, {failed[-bad]} to "
                        f"{failed[-1]}: part of the dataset is damaged; check data.path"
                    ) from None
                continue
            index = _id(example, image)
            if self.encoded:  # decoded and augmented on the device (data.decode_on_device)
                out = {"encoded": Encoded(decoded, _where(example, image))}
            else:
                with seeded(self.seed, self.epoch, index & 0xFFFFFFFF):
                    out = self.view(decoded)
            given += 1
            stream = (worker, {**position, "given": given})
            yield {
                **out,
                "labels": self._label(example),
                "index": index,
                "skipped": failed,
                "stream": stream,
                "repeat": kind == "repeat",
                "spare": kind == "spare",
            }
            failed, bad = [], 0
            if quota is not None and given >= quota:
                return


def stream_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`collate`, plus "stream": the (worker, position) after the batch's last item (a batch
    comes from one loader worker), "repeated" and "spares": its items that repeat a sample or
    make up for a skipped one."""
    streams = [it.pop("stream") for it in items]
    repeats = sum(it.pop("repeat") for it in items)
    spares = sum(it.pop("spare") for it in items)
    batch = collate(items)
    batch["stream"], batch["repeated"], batch["spares"] = streams[-1], repeats, spares
    return batch


COUNTS = ("skipped", "spares", "repeated")
"""What an epoch summary counts: samples skipped (unreadable), made up from the remainder, and
read a second time."""


class StreamLoader:
    """The loader of a stream on one process: epochs of `batches` batches (the same count on
    every process), its position saved and restored as JSON, each epoch's counts summarised in
    the log at its end.

    Not passed to `accelerator.prepare`, which would read the stream on one process and send
    batches to the others: every process reads its own share, and the caller moves batches to
    the device.
    """

    def __init__(
        self,
        dataset: ImageStream,
        loader: DataLoader,
        batches: int,
        settings: dict[str, Any],
        lost: list[str],
        buffer: int,
    ):
        self.dataset, self.loader, self.batches = dataset, loader, batches
        self.settings = settings
        """What the deal is drawn from: a resume with another of these restarts the epoch."""
        self.buffer = buffer
        """data.shuffle_buffer: a resume with another goes on exactly (logged)."""
        self.lost = lost
        """One entry per sample of a damaged shard, reported as skipped by each epoch's first
        batch (on process 0 only: each is counted once)."""
        self.epoch = 0
        self.positions: dict[int, dict[str, Any]] = {}
        """{loader worker: its stream position after the last batch consumed}, this epoch."""
        self.counts = dict.fromkeys(COUNTS, 0)
        """This epoch's counts so far."""
        self.repeated = 0
        """Samples repeated since the loader was built (the run's metrics)."""

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.positions, self.counts = {}, dict.fromkeys(COUNTS, 0)
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def iterate(self, start: int) -> Iterator[dict[str, Any]]:
        """Batches start..batches-1 of the epoch; from the saved positions when start > 0."""
        self.dataset.states = dict(self.positions) if start else {}
        # from saved positions (not an epoch restarted under another deal): rotate the shares
        self.dataset.rotate = start % max(1, self.loader.num_workers) if self.dataset.states else 0
        if not start:
            self.positions, self.counts = {}, dict.fromkeys(COUNTS, 0)
        batches = itertools.islice(self._passes(start), self.batches - start)
        for n, batch in enumerate(batches, start=start + 1):
            worker, state = batch.pop("stream")
            self.positions[worker] = state
            if n == 1 and self.lost:
                batch["skipped"] = [*self.lost, *batch["skipped"]]
            self.counts["skipped"] += len(batch["skipped"])
            self.counts["spares"] += batch.pop("spares")
            self.counts["repeated"] += batch["repeated"]
            self.repeated += batch.pop("repeated")
            if n == self.batches:  # before the last batch: a run may stop at it
                self.summarise()
            yield batch

    def _passes(self, start: int) -> Iterator[dict[str, Any]]:
        """The loader's batches; should this process's stream run dry before the epoch's batch
        count (a Hub stream: workers' dropped partial batches; shards never do), the epoch's
        stream again from its start, so that every process takes the same number of batches (a
        process that stopped early would leave the others waiting), its samples counted as
        repeated."""
        n, repeat = start, False
        while True:
            before = n
            for batch in self.loader:
                n += 1
                if repeat:
                    batch["repeated"] = len(batch["index"])
                yield batch
            if n == before:
                raise DataError(f"the stream of epoch {self.epoch} yields no batch")
            logger.warning(
                "the stream ran dry after %d of its %d batches in epoch %d: the rest of the "
                "epoch repeats samples from its start (counted in repeated_samples)",
                n,
                self.batches,
                self.epoch,
            )
            self.dataset.states, self.dataset.rotate, repeat = {}, 0, True

    def unread(self) -> int | None:
        """Samples of this process's share of the epoch's remainder left unread (None: not
        known, a Hub stream)."""
        return self.dataset.source.unread(max(1, self.loader.num_workers), self.positions)

    def summarise(self) -> None:
        """The epoch's summary in the log: a warning when a sample was repeated."""
        c, unread = self.counts, self.unread()
        (logger.warning if c["repeated"] else logger.info)(
            "stream epoch %d, process %d: %d batches; %d samples skipped (unreadable), %d made "
            "up from the epoch's remainder, %d repeated; %s of its share of the remainder unread",
            self.epoch,
            self.dataset.source.rank,
            self.batches,
            c["skipped"],
            c["spares"],
            c["repeated"],
            "?" if unread is None else unread,
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: the epoch, each worker's stream position ({} at an epoch's start), the
        epoch's counts so far, and the settings the deal is drawn from."""
        workers = {str(w): s for w, s in self.positions.items()}
        return {
            "epoch": self.epoch,
            "num_workers": self.loader.num_workers,
            "workers": workers,
            "counts": dict(self.counts),
            "settings": dict(self.settings),
            "shuffle_buffer": self.buffer,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state`; saved with other settings, the epoch's order restarts (logged)."""
        saved = state.get("settings")
        changed = (
            [f"{k}: {saved.get(k)} -> {v}" for k, v in self.settings.items() if saved.get(k) != v]
            if saved is not None
            else ["saved by an earlier version"]
        )
        self.epoch = state["epoch"]
        if changed:
            logger.warning(  # allowed by train.resume_changes (run_dir.check_config)
                "the stream's position was saved with other settings (%s): epoch %d's order "
                "restarts from its beginning, its samples read so far may repeat and others "
                "be left unread",
                "; ".join(changed),
                self.epoch,
            )
            self.positions, self.counts = {}, dict.fromkeys(COUNTS, 0)
        else:
            self.positions = {int(w): s for w, s in state["workers"].items()}
            self.counts = {k: int(state["counts"].get(k, 0)) for k in COUNTS}
            if state["shuffle_buffer"] != self.buffer:
                logger.info(
                    "data.shuffle_buffer: %d -> %d: each loader worker finishes the window it is "
                    "in at its saved size, its next windows take %d (nothing repeats or is lost)",
                    state["shuffle_buffer"],
                    self.buffer,
                    self.buffer,
                )
        self.dataset.set_epoch(self.epoch)


def hub_split(data_cfg: DataConfig, split: str) -> tuple[int | None, list[str]]:
    """(samples, class names) of split `split` of a Hub dataset (data.path hf:NAME), from the
    Hub's metadata."""
    import datasets

    path = data_cfg.path
    try:
        builder = datasets.load_dataset_builder(path[3:])
    except Exception as e:  # offline, unknown, gated: many error types
        raise DataError(f"{path}: cannot stream it ({type(e).__name__}: {e})") from None
    splits = builder.info.splits or {}
    if split not in splits:
        raise DataError(f"{path}: no split {split!r}; its splits: {list(splits)}")
    feature = (builder.info.features or {}).get(data_cfg.label_column)
    classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else []
    return splits[split].num_examples or None, classes


def parquet_classes(path: Path, label_column: str) -> list[str]:
    """The class names a Parquet file's schema gives `label_column` (a `datasets` ClassLabel,
    which to_parquet and the Hub keep in the schema's metadata); [] when it gives none."""
    import datasets
    import pyarrow.parquet as pq

    feature = datasets.Features.from_arrow_schema(pq.read_schema(path)).get(label_column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else []


def stream_classes(data_cfg: DataConfig) -> list[str]:
    """The class names of a stream's training split, from its metadata ([] when unlabeled)."""
    if data_cfg.path.startswith("hf:"):
        return hub_split(data_cfg, data_cfg.split)[1]
    root = Path(data_cfg.path)
    split = data_cfg.split
    return shard_classes(root, shard_files(root, split), split, data_cfg.label_column)


def shard_classes(root: Path, files: list[Path], split: str, label_column: str) -> list[str]:
    """The class names of a shard folder's split: its index's, else (Parquet without an index,
    e.g. a Hub repository's files, downloaded) those its first file's schema gives."""
    classes = read_index(root).get("splits", {}).get(split, {}).get("classes", [])
    if not classes and files[0].suffix == ".parquet":
        classes = parquet_classes(files[0], label_column)
    return classes


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
    """This process's stream of data.path through `view`: its share of the epoch's samples,
    shuffled by data.shuffle_buffer, in epochs of the same number of batches on every process
    (the whole global batches data.samples_per_epoch, or the whole dataset, holds)."""
    split = split or data_cfg.split
    path, wanted = data_cfg.path, data_cfg.samples_per_epoch
    lost: list[tuple[str, int]] = []
    if path.startswith("hf:"):
        size, classes = hub_split(data_cfg, split)
        if size is None and not wanted:
            raise DataError(
                f"data.path {path}: the stream's size is unknown; set data.samples_per_epoch"
            )
        shards = 0
        per_process = min(wanted or size, size or wanted) // processes
        source: ShardSource | HubSource = HubSource(
            path[3:], split, rank, processes, data_cfg.shuffle_buffer, seed
        )
    else:
        root = Path(path)
        files = shard_files(root, split)
        counts, lost = check_shards(root, files, split)
        size, shards = sum(counts), len(files)
        classes = shard_classes(root, files, split, data_cfg.label_column)
        per_process = min(wanted or size, size) // (processes * batch_size) * batch_size
        deal = Deal(
            [str(f) for f in files],
            counts,
            processes=processes,
            batch_size=batch_size,
            per_process=per_process,
            seed=seed,
        )
        source = ShardSource(deal, rank, data_cfg.shuffle_buffer, seed)
    if per_process < batch_size:
        asked = f" (data.samples_per_epoch {wanted})" if wanted else ""
        raise DataError(
            f"data.path {path}: {size} samples{asked} give no whole batch of {batch_size} to "
            f"each of the {processes} process(es); lower train.batch_size"
        )
    dataset = ImageStream(
        source,
        view,
        seed=seed,
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
        worker_init_fn=own_process_group,
    )
    batches = per_process // batch_size
    left = (size or 0) - processes * batches * batch_size
    logger.info(
        "streaming %s: %s samples in %s shards; %d batches of %d per process and epoch (%d "
        "processes), %s left over per epoch",
        path,
        size if size is not None else "?",
        shards or "?",
        batches,
        batch_size,
        processes,
        left if size is not None else "?",
    )
    settings = {
        "processes": processes,
        "data.num_workers": data_cfg.num_workers,
        "train.batch_size": batch_size,
        "train.seed": seed,
        "data.samples_per_epoch": wanted,
        "samples": size,
        "shards": shards,
    }
    reported = [where for where, n in lost for _ in range(n)] if rank == 0 else []
    return StreamLoader(dataset, loader, batches, settings, reported, data_cfg.shuffle_buffer)
