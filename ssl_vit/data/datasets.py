"""Datasets and loaders: image folders, Hugging Face datasets, the built-in synthetic dataset.

Every source is wrapped in one `ImageDataset`, which owns the two policies a long run needs:

* an unreadable image never loses a batch slot: item i falls through to the next readable index
  and reports the bad path in "skipped", so the training process can count and log it (a
  `SkipCounter`) even when images are decoded in worker processes;
* the augmentation of item i is a pure function of (seed, epoch, i): the same crops with any number
  of workers or processes and after a mid-epoch resume, and the training process's global RNG is
  never consumed by data loading.

`datasets` is imported only when a Hugging Face dataset is loaded: it is not needed otherwise.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS

from ssl_vit.config import EVAL_SPLITS, ConfigError, EvalDataConfig
from ssl_vit.data.encoded_batch import EncodedBatch
from ssl_vit.data.synthetic import SyntheticImages

logger = logging.getLogger(__name__)

MAX_TRIES = 64
"""An item gives up (DataError) after this many consecutive unreadable images."""
PROBE_SIZE = 16
"""Images decoded by `build_dataset` to fail fast on a mostly unreadable dataset."""


class DataError(ValueError):
    """The data cannot be used as configured; the message names the path, column or split."""


class Source(Protocol):
    """A sequence of (image, label) pairs; `source[i]` raises on an unreadable image."""

    classes: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Any, int]: ...

    def path(self, i: int) -> str:
        """Where item i comes from, for error messages and skip logs."""
        ...


def open_image(obj: Any) -> Image.Image:
    """Decode a file path, raw bytes, a {"bytes", "path"} dict or a PIL image -> RGB PIL image.

    The full decode happens here (convert loads every pixel) with PIL's LOAD_TRUNCATED_IMAGES
    left off, so truncated files raise now rather than yield half-grey images.
    """
    if isinstance(obj, Image.Image):
        return obj.convert("RGB")
    if isinstance(obj, dict):
        obj = obj["bytes"] if obj.get("bytes") is not None else obj["path"]
    with Image.open(io.BytesIO(obj) if isinstance(obj, bytes) else obj) as im:
        return im.convert("RGB")


class ImageFiles:
    """Image files with integer labels (-1 when unlabeled)."""

    def __init__(self, files: list[str], labels: list[int], classes: list[str]):
        self.files, self.labels, self.classes = files, labels, classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return open_image(self.files[i]), self.labels[i]

    def path(self, i: int) -> str:
        return self.files[i]


class HFImages:
    """Rows of a Hugging Face `Dataset`; images are decoded here so bad ones can be skipped."""

    def __init__(self, ds: Any, name: str, image_column: str, label_column: str):
        import datasets

        if image_column not in ds.column_names:
            raise DataError(
                f"{name}: no image column {image_column!r} (data.image_column); "
                f"available columns: {ds.column_names}"
            )
        if label_column and label_column not in ds.column_names:
            logger.info("%s: no label column %r; items are unlabeled (-1)", name, label_column)
            label_column = ""
        ds = ds.select_columns([c for c in (image_column, label_column) if c])
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.classes: list[str] = []
        feature = ds.features[label_column] if label_column else None
        if isinstance(feature, datasets.ClassLabel):
            self.classes = list(feature.names)
        elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
            values = [v for v in ds.unique(label_column) if v is not None and v >= 0]
            self.classes = [str(k) for k in range(max(values, default=-1) + 1)]
        elif feature is not None:
            raise DataError(
                f"{name}: label column {label_column!r} (data.label_column) holds {feature}, not "
                "integer class ids; set data.label_column '' to load the images unlabeled"
            )
        self.ds, self.name = ds, name
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        row = self.ds[i]
        label = row[self.label_column] if self.label_column else None
        return open_image(row[self.image_column]), -1 if label is None else int(label)

    def path(self, i: int) -> str:
        return f"{self.name}[{i}]"


class ImageDataset(torch.utils.data.Dataset):
    """`source` items through a `view`: item i -> {view fields..., "labels", "index", "skipped"}.

    "labels" is an int (-1 unlabeled) and "index" is i. Index i + k x len (k > 0) gives item i
    through the view's choice k (a `ViewChoice`). When image i cannot be read, the item
    holds the next readable image (i+1, i+2, ...) and its label, and "skipped" is [path of image
    i]; otherwise "skipped" is [].
    """

    def __init__(self, source: Source, view: Callable[[Any], dict[str, Any]], seed: int = 0):
        self.source, self.view, self.seed, self.epoch = source, view, seed, 0

    @property
    def classes(self) -> list[str]:
        """Class names by label (empty when unlabeled)."""
        return self.source.classes

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of `epoch`; set before creating the loader's iterator."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        choice, i = divmod(i, len(self))  # a view's choice, from samplers.MixedSizes
        failed = []
        for k in range(min(MAX_TRIES, len(self))):
            j = (i + k) % len(self)
            try:
                image, label = self.source[j]
            # PIL signals bad data with many exception types (OSError, SyntaxError, struct.error,
            # DecompressionBombError, ...); only the read of one image is guarded. Running out of
            # memory is not a bad image (torch's CPU allocator says so with a RuntimeError).
            except (MemoryError, DataError):  # bad input that is no unreadable image
                raise
            except Exception as e:
                if "can't allocate memory" in str(e):
                    raise
                failed.append(self.source.path(j))
                continue
            with seeded(self.seed, self.epoch, i):
                out = self.view(image, choice) if choice else self.view(image)
            # Only item i's own image is reported, so each unreadable file is counted exactly
            # once per epoch, by whichever worker or process loads its index.
            return {**out, "labels": label, "index": i, "skipped": failed[:1]}
        raise DataError(
            f"{len(failed)} consecutive images could not be read, {failed[0]} to {failed[-1]}: "
            "part of the dataset is damaged or missing; check data.path"
        )


@contextlib.contextmanager
def seeded(*key: int) -> Iterator[None]:
    """Seed torch's CPU RNG, `random` and numpy from `key` inside the block; restore them after."""
    hi, lo = (int(s) for s in np.random.SeedSequence(list(key)).generate_state(2))
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # Not torch.manual_seed: it would also reseed (and so consume) the CUDA generators.
        torch.default_generator.manual_seed(hi << 32 | lo)
        random.seed(hi)
        np.random.seed(lo)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Items -> batch: "images" (B, C, H, W); "crops" one (B, C, h, w) per crop position;
    "masks" (B, H, W) int64 (segmentation); "labels", "index" (B,) int64; "skipped" one flat
    list of paths; "encoded" (data.device: the undecoded file bytes) one EncodedBatch."""
    first = items[0]
    batch: dict[str, Any] = {}
    if "images" in first:
        batch["images"] = torch.stack([it["images"] for it in items])
    if "crops" in first:
        batch["crops"] = [torch.stack(c) for c in zip(*(it["crops"] for it in items), strict=True)]
    if "masks" in first:
        batch["masks"] = torch.stack([it["masks"] for it in items])
    batch["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
    batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    batch["skipped"] = [p for it in items for p in it["skipped"]]
    if "encoded" in first:
        batch["encoded"] = EncodedBatch.pack([it["encoded"] for it in items])
    return batch


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""The signals that ask a run to stop after a checkpoint (train.preemption)."""


def own_process_group(worker_id: int = 0) -> None:
    """A loader worker's start: STOP_SIGNALS are only its training process's business. A relay to
    the training process's group (torchrun's SIGTERM to each rank's, a terminal's Ctrl-C) or to
    every process of the job (SLURM's scancel and preemption) must not kill a worker mid-epoch, or
    the run stops on a dead worker instead of saving. So the worker leaves the group, and a thread
    takes the signals (forked with them blocked: deferred_stop_signals): SIGTERM from the
    training process (its loader's shutdown) ends the worker, as torch's own handler does; any
    other is dropped. SIGKILL still ends it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a loader forked outside the deferral
    os.setpgid(0, 0)
    threading.Thread(target=take_stop_signals, args=(os.getppid(),), daemon=True).start()


def take_stop_signals(parent: int) -> None:
    """A loader worker's signal thread: exit at its training process's SIGTERM, drop the rest."""
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


def build_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    num_workers: int,
    pin_memory: bool,
    seed: int,
    sampler: torch.utils.data.Sampler | None = None,
    timeout: float = 0,
) -> DataLoader:
    """A plain DataLoader over `dataset` with `collate`; with workers, waiting at most `timeout`
    seconds (0: forever) for a batch, so that a stuck worker stops the run instead of hanging it.

    Its own generator (seeded by `seed`) drives shuffling and worker seeds, so creating an
    iterator leaves the global torch RNG alone. Workers are not persistent, so a `set_epoch`
    made before each epoch reaches the fresh workers. A `sampler` (e.g. repeated augmentation)
    replaces the shuffling.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        collate_fn=collate,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
        timeout=timeout if num_workers else 0,
        worker_init_fn=own_process_group,
    )


class SkipCounter:
    """Counts the unreadable images reported in batches' "skipped" lists, in the training process.

    Logs each path once, and raises DataError once more than `max_bad_fraction` of at least
    `min_seen` images accounted were unreadable: a dataset in which most images fail is a
    configuration error, not something to train through.
    """

    def __init__(self, max_bad_fraction: float, min_seen: int = 100):
        self.max_bad_fraction, self.min_seen = max_bad_fraction, min_seen
        self.total = 0
        """Unreadable images reported so far (an image counts once per epoch)."""
        self.seen = 0
        """Images accounted so far: unreadable plus read."""
        self.paths: set[str] = set()

    def update(self, skipped: list[str], n_ok: int) -> None:
        """Account one batch: `skipped` = batch["skipped"]; `n_ok` = the batch's other items,
        whose own image was read (batch size - len(skipped))."""
        self.seen += len(skipped) + n_ok
        for path in skipped:
            self.total += 1
            if path not in self.paths:
                self.paths.add(path)
                logger.warning("skipped unreadable image %s (%d so far)", path, self.total)
        if self.seen >= self.min_seen and self.total > self.max_bad_fraction * self.seen:
            examples = ", ".join(sorted(self.paths)[:3])
            raise DataError(
                f"most images fail: {self.total} of {self.seen} images could not be read, "
                f"e.g. {examples}; check data.path (data.max_bad_fraction = "
                f"{self.max_bad_fraction})"
            )


def build_dataset(
    data_cfg: EvalDataConfig,
    view: Callable[[Any], dict[str, Any]],
    split: str | None = None,
    *,
    seed: int = 0,
    image_size: int = 224,
    classes: Sequence[str] | None = None,
) -> ImageDataset:
    """The dataset `data_cfg.path` names, split `split` (default data_cfg.split), through `view`.

    Only the training split (data_cfg.split) may be the folder itself when it has no such
    sub-folder (a flat or class-folder tree); any other split must exist as one, or this raises:
    an evaluation never silently reads the training images. `classes` (the training split's class
    names) labels an evaluation split by name, so a split missing a class keeps the same indices.
    `seed` keys the per-sample augmentation; `image_size` is the side of the rendered synthetic
    images (files keep their own size). File-backed sources are probed: when more than
    data_cfg.max_bad_fraction of a sample of images cannot be read, this raises before training.
    """
    split = split or data_cfg.split
    path = data_cfg.path
    field = "data.split" if split == data_cfg.split else "data.val_split"
    if path == "synthetic":
        size = data_cfg.synthetic_size
        if split != "train":
            size = max(size // 10, data_cfg.synthetic_classes)
        try:
            source: Source = SyntheticImages(size, data_cfg.synthetic_classes, image_size, split)
        except ValueError as e:
            raise DataError(f"data.path 'synthetic': {e} ({field})") from None
        return ImageDataset(source, view, seed)
    if path.startswith("hf:"):
        source, where = _hub_dataset(path[3:], split, data_cfg, field), path
    else:
        root = Path(path)
        if not root.exists():
            raise DataError(f"data.path {path!r} does not exist")
        if not _is_saved_hf(root) and (root / split).is_dir():
            root = root / split
        elif not _is_saved_hf(root) and split != data_cfg.split:
            raise DataError(
                f"{root}: no split {split!r} ({field}): no such sub-folder; "
                f"its sub-folders: {_subfolders(root)}"
            )
        if _is_saved_hf(root):
            source = _saved_hf_dataset(root, split, data_cfg, field)
        else:
            source = _image_folder(root, classes)
        where = str(root)
    _probe(source, data_cfg.max_bad_fraction, where)
    return ImageDataset(source, view, seed)


def eval_split(data_cfg: EvalDataConfig) -> str:
    """The split evaluations read: data_cfg.val_split as named, or for 'auto' the first of
    EVAL_SPLITS the data has that is not the training split (data.split, the k-NN bank).
    Scoring the training images against themselves would measure memory, so that is done only
    when data.val_split names data.split: ConfigError when 'auto' finds only the training split,
    DataError when it finds no split at all."""
    if data_cfg.val_split != "auto":
        return data_cfg.val_split
    path = data_cfg.path
    if path == "synthetic":
        found = ["train", "val"]
    elif path.startswith("hf:"):
        found = _hub_split_names(path[3:])
    else:
        root = Path(path)
        if _is_saved_hf(root):
            found = _saved_splits(root)
        else:  # split sub-folders beside data.split's; without it the folder is one set
            found = _subfolders(root) if (root / data_cfg.split).is_dir() else []
    for split in EVAL_SPLITS:
        if split in found and split != data_cfg.split:
            return split
    if data_cfg.split in EVAL_SPLITS and data_cfg.split in found:
        raise ConfigError(
            [
                f"data.val_split auto: the only evaluation split of {path}, "
                f"{data_cfg.split!r}, is the training split (data.split, the k-NN bank): it "
                "would be scored against itself. Train on another split (--data.split), name "
                "another evaluation split (--data.val_split NAME), or ask for this one by name: "
                f"--data.val_split {data_cfg.split} (results then say held_out false)"
            ]
        )
    raise DataError(
        f"data.val_split auto: {path} has no held-out split ({', '.join(EVAL_SPLITS)}); its "
        f"splits: {found or 'none (one set of images)'}. Add one, name one with --data.val_split "
        f"NAME, or evaluate on the training images with --data.val_split {data_cfg.split} "
        "(results then say held_out false)"
    )


def _subfolders(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _is_saved_hf(root: Path) -> bool:
    """The marker files `datasets.load_from_disk` looks for."""
    saved = (root / "dataset_info.json").is_file() and (root / "state.json").is_file()
    return saved or (root / "dataset_dict.json").is_file()


def _saved_splits(root: Path) -> list[str]:
    """The splits of a saved DatasetDict (its dataset_dict.json); [] for a single Dataset."""
    marker = root / "dataset_dict.json"
    return list(json.loads(marker.read_text())["splits"]) if marker.is_file() else []


def _saved_hf_dataset(root: Path, split: str, data_cfg: EvalDataConfig, field: str) -> HFImages:
    import datasets

    ds = datasets.load_from_disk(str(root))
    name = str(root)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{root}: no split {split!r} ({field}); available: {list(ds)}")
        ds, name = ds[split], f"{root}:{split}"
    elif split != data_cfg.split:
        raise DataError(
            f"{root}: a single saved Dataset (the training data) has no split {split!r} "
            f"({field}); save a DatasetDict with a held-out split"
        )
    return HFImages(ds, name, data_cfg.image_column, data_cfg.label_column)


def _hub_error(name: str, e: Exception) -> DataError:
    """One line for a Hub dataset that cannot be had (offline, unknown name, no access), whose
    advice depends on whether offline mode is set already."""
    reason = " ".join(str(e).split())[:300]
    if _offline():
        return DataError(
            f"hf:{name}: not in the local cache, and offline mode is set (HF_HUB_OFFLINE / "
            f"HF_DATASETS_OFFLINE) ({type(e).__name__}: {reason}). Load it once where the Hub "
            "can be reached, or use a copy saved with save_to_disk (data.path DIR)"
        )
    return DataError(
        f"hf:{name}: cannot load it from the Hugging Face Hub ({type(e).__name__}: {reason}). "
        "Offline, use a copy saved with save_to_disk (data.path DIR), or set HF_HUB_OFFLINE=1 to "
        "read the local cache"
    )


def _offline() -> bool:
    """Whether Hugging Face's offline mode is set (the Hub client's, or `datasets`' own)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "")


def _check_hub(name: str) -> None:
    """One request to the Hub (through its client, proxies included) before `datasets` asks it,
    which retries an unreachable Hub for most of a minute; nothing when offline mode is set."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if _offline():
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as e:  # requests' or httpx's connection errors, by version
        raise _hub_error(name, e) from None


def _hub_split_names(name: str) -> list[str]:
    import datasets

    _check_hub(name)
    try:
        return list(datasets.get_dataset_split_names(name))
    except Exception as e:  # offline, unknown or gated: the Hub's errors have many types
        raise _hub_error(name, e) from None


def _hub_dataset(name: str, split: str, data_cfg: EvalDataConfig, field: str) -> HFImages:
    import datasets

    _check_hub(name)
    try:
        ds = datasets.load_dataset(name, split=split)
    except ValueError as e:  # an unknown split; the message lists the available ones
        raise DataError(f"hf:{name}: {e} ({field})") from None
    except Exception as e:  # offline, unknown or gated: the Hub's errors have many types
        raise _hub_error(name, e) from None
    return HFImages(ds, f"hf:{name}:{split}", data_cfg.image_column, data_cfg.label_column)


def _find_images(root: Path) -> list[str]:
    """Image files under `root`, recursively (following links), sorted; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)
        ]
    return found


def _image_folder(root: Path, classes: Sequence[str] | None = None) -> ImageFiles:
    """Class sub-folders (labels = sorted sub-folder index, as torchvision's ImageFolder; with
    `classes`, the index of the folder's name in it) when `root` holds only sub-folders with
    images, else every image under `root` with label -1."""
    if not any(f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS) for f in root.iterdir()):
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        per_class = {d.name: files for d in subdirs if (files := _find_images(d))}
        if per_class:
            names = list(per_class) if classes is None else list(classes)
            if unknown := [c for c in per_class if c not in names]:
                raise DataError(
                    f"{root}: class folders {unknown} are no class of the training split "
                    f"(its classes: {names[:20]})"
                )
            files = [f for c in per_class for f in per_class[c]]
            labels = [names.index(c) for c in per_class for _ in per_class[c]]
            return ImageFiles(files, labels, names)
    files = _find_images(root)
    if not files:
        exts = ", ".join(IMG_EXTENSIONS)
        raise DataError(f"data.path: no images found in {root} (looked recursively for {exts})")
    return ImageFiles(files, [-1] * len(files), [])


def _probe(source: Source, max_bad_fraction: float, where: str) -> None:
    """Decode up to PROBE_SIZE evenly spaced images; raise DataError when too many fail."""
    if len(source) == 0:
        raise DataError(f"data.path: {where} holds no images")
    picks = sorted({round(float(x)) for x in np.linspace(0, len(source) - 1, PROBE_SIZE)})
    bad = []
    for i in picks:
        try:
            source[i]
        except Exception:  # any decode failure, as in ImageDataset.__getitem__
            bad.append(source.path(i))
    if len(bad) > max_bad_fraction * len(picks):
        raise DataError(
            f"data.path: {len(bad)} of {len(picks)} sampled images in {where} could not be read "
            f"(data.max_bad_fraction = {max_bad_fraction}), e.g. {', '.join(bad[:3])}"
        )
