"""Semantic segmentation data: image + mask pairs, and views that keep the two aligned.

Layouts `build_segmentation` reads from data.path:

* ADE20K: `images/{training,validation}/*.jpg`, `annotations/{training,validation}/*.png`;
  0 = "other", dropped by reduce_zero_label (0 -> 255, k -> k - 1): 150 classes.
* Pascal VOC: `JPEGImages/ID.jpg`, `SegmentationClass/ID.png` (palette indices),
  `ImageSets/Segmentation/{train,val}.txt`; 255 = ignore (object borders): 21 classes.
* a pair of folders: `images/` and `masks/` with the same file stems (or `SPLIT/images/`,
  `SPLIT/masks/` per split).
* a Hugging Face dataset saved with `save_to_disk` (or `hf:NAME`) with an image column and a mask
  column (data.image_column, data.mask_column): scene_parse_150's `image` / `annotation`.
* `synthetic`: the synthetic shapes (ssl_vit.data.synthetic), each pixel the class of the shape
  drawn there (label + 1), background 0; the background always one dark colour (the
  classification set draws it at random: see SyntheticImages).
* `digits`: scikit-learn's 8 x 8 digits, ink pixels (value >= 8 of 16) labelled digit + 1,
  background 0; the first 80% train, the rest val.

A `classes.json` in the dataset's folder names the classes and may drop some: a list of names, or
{"classes": [...], "ignore": [ids]} (ids as stored in the masks; ignored pixels become 255 and the
other classes are numbered consecutively). Without one, the layout's own classes (ADE20K, VOC,
the built-in sets), or the training masks' largest label + 1.

Bad input is one DataError naming the file: an image without a mask, a mask of another size than
its image, a label outside the classes. Masks are 8-bit (at most 255 labels, 255 = ignore).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from ssl_vit.config import EVAL_SPLITS, ConfigError, DataConfig, EvalDataConfig
from ssl_vit.data.datasets import (
    DataError,
    ImageDataset,
    _check_hub,
    _hub_error,
    _hub_split_names,
    _is_saved_hf,
    _saved_splits,
    open_image,
)
from ssl_vit.data.synthetic import SyntheticImages

IGNORE_INDEX = 255
"""The label of pixels no loss or metric counts (VOC's borders, ADE20K's 'other', padding)."""

ADE20K_CLASSES = (
    "wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person earth "
    "door table mountain plant curtain chair car water painting sofa shelf house sea mirror rug "
    "field armchair seat fence desk rock wardrobe lamp bathtub railing cushion base box column "
    "signboard chest_of_drawers counter sand sink skyscraper fireplace refrigerator grandstand "
    "path stairs runway case pool_table pillow screen_door stairway river bridge bookcase blind "
    "coffee_table toilet flower book hill bench countertop stove palm kitchen_island computer "
    "swivel_chair boat bar arcade_machine hovel bus towel light truck tower chandelier awning "
    "streetlight booth television_receiver airplane dirt_track apparel pole land bannister "
    "escalator ottoman bottle buffet poster stage van ship fountain conveyer_belt canopy washer "
    "plaything swimming_pool stool barrel basket waterfall tent bag minibike cradle oven ball "
    "food step tank trade_name microwave pot animal bicycle lake dishwasher screen blanket "
    "sculpture hood sconce vase traffic_light tray ashcan fan pier crt_screen plate monitor "
    "bulletin_board shower radiator glass clock flag"
).split()
"""ADE20K's 150 scene-parsing classes, in label order (1..150, 0 'other' reduced away)."""
VOC_CLASSES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
    "motorbike person pottedplant sheep sofa train tvmonitor"
).split()
DIGIT_INK = 8
"""A digits pixel (0..16) at or above this is ink."""
ADE_SPLITS = {"train": "training", "val": "validation"}
"""ADE20K's folder names for the usual split names."""


class SegSample(NamedTuple):
    """What a segmentation source gives a view: the image (PIL or uint8 (3, H, W)) and its mask
    uint8 (H, W) of class ids (IGNORE_INDEX ignored)."""

    image: Any
    mask: Tensor


def read_mask(obj: Any, where: str) -> np.ndarray:
    """A mask file, bytes or {"bytes", "path"} dict (PNG: palette indices or grey levels) ->
    (H, W) int64. A colour mask is refused (its classes would be colours)."""
    if isinstance(obj, dict):
        obj = obj["bytes"] if obj.get("bytes") is not None else obj["path"]
    if isinstance(obj, Image.Image):
        mask = np.asarray(obj)
    else:
        with Image.open(io.BytesIO(obj) if isinstance(obj, bytes) else obj) as im:
            mask = np.asarray(im)
    if mask.ndim != 2:
        raise DataError(f"{where}: a mask must be one channel of class ids, got shape {mask.shape}")
    return mask.astype(np.int64)


@dataclass(frozen=True)
class Labels:
    """How stored mask values become class ids: `lut` maps each stored value (0..255) to a class
    id or IGNORE_INDEX, -1 for a value outside the classes (an error naming the file)."""

    lut: tuple[int, ...]
    classes: tuple[str, ...]

    def __call__(self, mask: np.ndarray, where: str) -> Tensor:
        if mask.min() < 0 or mask.max() >= len(self.lut):
            bad = int(mask.max() if mask.max() >= len(self.lut) else mask.min())
            raise DataError(f"{where}: label {bad} outside the {len(self.classes)} classes")
        out = np.asarray(self.lut, dtype=np.int64)[mask]
        if (out < 0).any():
            bad = int(mask[out < 0].flat[0])
            raise DataError(
                f"{where}: label {bad} outside the {len(self.classes)} classes (0..."
                f"{len(self.classes) - 1}, {IGNORE_INDEX} ignored)"
            )
        return torch.from_numpy(out.astype(np.uint8))


def make_labels(
    classes: Sequence[str], reduce_zero_label: bool, ignore: Sequence[int] = ()
) -> Labels:
    """`Labels` for masks storing `classes` (after reduce_zero_label: stored 0 ignored, k the
    class k - 1), with the stored ids `ignore` dropped (IGNORE_INDEX) and the rest renumbered."""
    lut = [-1] * 256
    lut[IGNORE_INDEX] = IGNORE_INDEX
    stored = range(1, len(classes) + 1) if reduce_zero_label else range(len(classes))
    if reduce_zero_label:
        lut[0] = IGNORE_INDEX
    kept = []
    for value, name in zip(stored, classes, strict=True):
        if value in ignore:
            lut[value] = IGNORE_INDEX
        else:
            lut[value] = len(kept)
            kept.append(name)
    return Labels(tuple(lut), tuple(kept))


class SegFiles:
    """Image and mask files, paired."""

    def __init__(self, images: list[str], masks: list[str], labels: Labels):
        self.images, self.masks, self.labels = images, masks, labels
        self.classes = list(labels.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[SegSample, int]:
        image = open_image(self.images[i])
        where = self.masks[i]
        return SegSample(image, checked(image, read_mask(where, where), self.labels, where)), -1

    def path(self, i: int) -> str:
        return self.images[i]


def checked(image: Any, mask: np.ndarray, labels: Labels, where: str) -> Tensor:
    """The mask as class ids, after checking it has its image's size."""
    size = image.size[::-1] if isinstance(image, Image.Image) else tuple(image.shape[-2:])
    if tuple(mask.shape) != tuple(size):
        raise DataError(
            f"{where}: mask of {mask.shape[1]}x{mask.shape[0]} pixels, its image "
            f"{size[1]}x{size[0]}"
        )
    return labels(mask, where)


class SegRows:
    """Rows of a Hugging Face dataset with an image and a mask column."""

    def __init__(self, ds: Any, name: str, image_column: str, mask_column: str):
        import datasets

        for column, key in ((image_column, "image_column"), (mask_column, "mask_column")):
            if column not in ds.column_names:
                raise DataError(
                    f"{name}: no column {column!r} (data.{key}); its columns: {ds.column_names}"
                )
        ds = ds.select_columns([image_column, mask_column])
        for column in (image_column, mask_column):
            if isinstance(ds.features[column], datasets.Image):
                ds = ds.cast_column(column, datasets.Image(decode=False))
        self.ds, self.name, self.columns = ds, name, (image_column, mask_column)
        self.labels: Labels | None = None
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.ds)

    def raw(self, i: int) -> tuple[Image.Image, np.ndarray]:
        row = self.ds[i]
        return open_image(row[self.columns[0]]), read_mask(row[self.columns[1]], self.path(i))

    def __getitem__(self, i: int) -> tuple[SegSample, int]:
        image, mask = self.raw(i)
        return SegSample(image, checked(image, mask, self.labels, self.path(i))), -1

    def path(self, i: int) -> str:
        return f"{self.name}[{i}]"


class SyntheticSegmentation:
    """The synthetic shapes with their masks: pixel = label + 1 where the shape covers more than
    half of it, else 0 (background)."""

    def __init__(self, images: SyntheticImages):
        self.images = images
        self.classes = ["background", *images.classes]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[SegSample, int]:
        image, cover, label = self.images.with_cover(i)
        mask = torch.where(cover > 0.5, label + 1, 0).to(torch.uint8)
        return SegSample(image, mask), -1

    def path(self, i: int) -> str:
        return self.images.path(i)


class DigitsSegmentation:
    """scikit-learn's digits (1797 images of 8 x 8, ink 0..16) as per-pixel classes: ink pixels
    (>= DIGIT_INK) the digit + 1, background 0; each pixel a block of image_size / 8 pixels."""

    def __init__(self, split: str, image_size: int):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise DataError(
                "data.path 'digits' needs scikit-learn: pip install scikit-learn"
            ) from None
        if split not in ("train", "val"):
            raise DataError(f"data.path 'digits': no split {split!r}; available: ['train', 'val']")
        digits = load_digits()
        cut = int(0.8 * len(digits.target))
        part = slice(0, cut) if split == "train" else slice(cut, None)
        self.pixels = torch.from_numpy(digits.images[part]).float()  # (N, 8, 8) in 0..16
        self.targets = torch.from_numpy(digits.target[part])
        self.scale, self.split = max(1, image_size // 8), split
        self.classes = ["background", *map(str, range(10))]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[SegSample, int]:
        p = self.pixels[i].repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)
        image = (p / 16 * 255).round().to(torch.uint8).expand(3, -1, -1).contiguous()
        mask = torch.where(p >= DIGIT_INK, int(self.targets[i]) + 1, 0).to(torch.uint8)
        return SegSample(image, mask), -1

    def path(self, i: int) -> str:
        return f"digits:{self.split}[{i}]"


# ----------------------------------------------------------------------------- layouts


def _files(folder: Path) -> dict[str, Path]:
    """Stem -> file of the images under `folder` (recursively, hidden entries skipped)."""
    found = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(IMG_EXTENSIONS):
            found[str(f.relative_to(folder).with_suffix(""))] = f
    return found


def _pair(images: Path, masks: Path, stems: Sequence[str] | None = None) -> tuple[list, list]:
    """(image files, mask files) paired by stem; an image without a mask is a DataError."""
    imgs, msks = _files(images), _files(masks)
    if stems is not None:
        missing = [s for s in stems if s not in imgs]
        if missing:
            raise DataError(f"{images}: no image {missing[0]!r} of the split list")
        imgs = {s: imgs[s] for s in stems}
    if not imgs:
        raise DataError(f"{images}: no images")
    for stem, image in imgs.items():
        if stem not in msks:
            raise DataError(f"{image}: an image without a mask (no {masks / stem}.png)")
    return [str(f) for f in imgs.values()], [str(msks[s]) for s in imgs]


def layout(root: Path) -> str:
    """Which layout the folder `root` holds: ade20k, voc, folders or hf."""
    if _is_saved_hf(root):
        return "hf"
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        return "ade20k"
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return "voc"
    if (root / "images").is_dir() or any((d / "images").is_dir() for d in _dirs(root)):
        return "folders"
    raise DataError(
        f"data.path {str(root)!r}: no segmentation layout: expected images/ + annotations/ "
        "(ADE20K), JPEGImages/ + SegmentationClass/ (VOC), images/ + masks/, or a saved Hugging "
        "Face dataset"
    )


def _dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def splits_of(data_cfg: EvalDataConfig) -> list[str]:
    """The splits data.path has (names as they are stored)."""
    path = data_cfg.path
    if path in ("synthetic", "digits"):
        return ["train", "val"]
    if path.startswith("hf:"):
        return _hub_split_names(path[3:])
    root = Path(path)
    kind = layout(root)
    if kind == "hf":
        return _saved_splits(root) or [data_cfg.split]
    if kind == "ade20k":
        return [d.name for d in _dirs(root / "images")]
    if kind == "voc":
        return sorted(f.stem for f in (root / "ImageSets" / "Segmentation").glob("*.txt"))
    split_dirs = [d.name for d in _dirs(root) if (d / "images").is_dir()]
    return split_dirs or [data_cfg.split]


def seg_eval_split(data_cfg: EvalDataConfig) -> str:
    """data.val_split, or for 'auto' the first of EVAL_SPLITS (and ADE20K's 'validation') the
    data has other than the training split."""
    if data_cfg.val_split != "auto":
        return data_cfg.val_split
    found = splits_of(data_cfg)
    train = _split_name(data_cfg, data_cfg.split, found)
    for split in EVAL_SPLITS:
        if split in found and split != train:
            return split
    raise ConfigError(
        [
            f"data.val_split auto: {data_cfg.path} has no held-out split ({', '.join(EVAL_SPLITS)})"
            f"; its splits: {found}. Name one with --data.val_split NAME (the training split "
            "too: results then say held_out false)"
        ]
    )


def _split_name(data_cfg: EvalDataConfig, split: str, found: Sequence[str]) -> str:
    """`split` as the data stores it (ADE20K: train -> training, val -> validation)."""
    return ADE_SPLITS.get(split, split) if split not in found else split


def _class_file(root: Path) -> tuple[list[str] | None, list[int]]:
    """(class names or None, ignored stored ids) from root/classes.json."""
    f = root / "classes.json"
    if not f.is_file():
        return None, []
    try:
        spec = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: not JSON ({e})") from None
    if isinstance(spec, list):
        spec = {"classes": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), list):
        raise DataError(f'{f}: expected a list of names or {{"classes": [...], "ignore": [...]}}')
    return [str(c) for c in spec["classes"]], [int(i) for i in spec.get("ignore", [])]


def _reduce(data_cfg: EvalDataConfig, default: bool) -> bool:
    r = data_cfg.reduce_zero_label
    return default if r == "auto" else r == "yes"


def _counted(read: Callable[[int], np.ndarray], n: int, reduce: bool, where: str) -> list[str]:
    """Class names '0', '1', ... up to the largest label of the `n` masks `read` gives."""
    top = -1
    for i in range(n):
        m = read(i)
        m = m[m != IGNORE_INDEX]
        if reduce:
            m = m[m != 0] - 1
        top = max(top, int(m.max()) if m.size else -1)
    if top < 0:
        raise DataError(f"{where}: the training masks hold no labelled pixel")
    return [str(k) for k in range(top + 1)]


def build_segmentation(
    data_cfg: EvalDataConfig,
    view: Callable[[Any], dict[str, Any]],
    split: str | None = None,
    *,
    seed: int = 0,
    image_size: int = 224,
    classes: Sequence[str] | None = None,
) -> ImageDataset:
    """The segmentation data at data.path, split `split` (default data.split), through `view`
    (a `SegView`): items {"images", "masks", "index", "skipped", "labels" (-1)}. `classes`, the
    training split's class names, is what another split is checked against; `image_size` is
    the side of the built-in sets' images. Its first item is read here, so bad input fails
    before training."""
    split = split or data_cfg.split
    source = _source(data_cfg, split, image_size)
    if classes is not None and list(source.classes) != list(classes):
        raise DataError(
            f"split {split!r} of {data_cfg.path} has other classes than the training split: "
            f"{source.classes[:10]} vs {list(classes)[:10]}"
        )
    source[0]
    return ImageDataset(source, view, seed)


def _source(data_cfg: EvalDataConfig, split: str, image_size: int) -> Any:
    path = data_cfg.path
    if path == "synthetic":
        size = data_cfg.synthetic_size
        if split != "train":
            size = max(size // 10, data_cfg.synthetic_classes)
        try:
            images = SyntheticImages(
                size, data_cfg.synthetic_classes, image_size, split, dark_background=True
            )
        except ValueError as e:
            raise DataError(f"data.path 'synthetic': {e}") from None
        return SyntheticSegmentation(images)
    if path == "digits":
        return DigitsSegmentation(split, image_size)
    if path.startswith("hf:"):
        import datasets

        _check_hub(path[3:])
        try:
            ds = datasets.load_dataset(path[3:], split=split)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None
        except Exception as e:  # offline, unknown or gated
            raise _hub_error(path[3:], e) from None
        return _hf_source(ds, f"{path}:{split}", data_cfg, None, "scene_parse" in path)
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"data.path {path!r} is no folder")
    kind = layout(root)
    names, ignore = _class_file(root)
    found = splits_of(data_cfg)
    stored = _split_name(data_cfg, split, found)
    if stored not in found:
        raise DataError(f"{root}: no split {split!r}; its splits: {found}")
    if kind == "hf":
        import datasets

        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[stored]
        ade = "scene_parse" in root.name  # a saved scene_parse_150: ADE20K's classes, reduced
        return _hf_source(ds, f"{root}:{stored}", data_cfg, (names, ignore), ade)
    if kind == "ade20k":
        imgs, masks = _pair(root / "images" / stored, root / "annotations" / stored)
        default, reduce = ADE20K_CLASSES, _reduce(data_cfg, True)
    elif kind == "voc":
        ids = (root / "ImageSets" / "Segmentation" / f"{stored}.txt").read_text().split()
        imgs, masks = _pair(root / "JPEGImages", root / "SegmentationClass", ids)
        default, reduce = VOC_CLASSES, _reduce(data_cfg, False)
    else:
        base = root / stored if (root / stored / "images").is_dir() else root
        imgs, masks = _pair(base / "images", base / "masks")
        default, reduce = None, _reduce(data_cfg, False)
    if names is None:
        names = default or _counted(
            lambda i: read_mask(masks[i], masks[i]), len(masks), reduce, str(root)
        )
    return SegFiles(imgs, masks, make_labels(names, reduce, ignore))


def _hf_source(
    ds: Any, name: str, data_cfg: EvalDataConfig, spec: tuple | None, ade: bool
) -> SegRows:
    rows = SegRows(ds, name, data_cfg.image_column, data_cfg.mask_column)
    names, ignore = spec or (None, [])
    reduce = _reduce(data_cfg, ade)
    if names is None:
        names = (
            ADE20K_CLASSES if ade else _counted(lambda i: rows.raw(i)[1], len(rows), reduce, name)
        )
    rows.labels = make_labels(names, reduce, ignore)
    rows.classes = list(rows.labels.classes)
    return rows


# ----------------------------------------------------------------------------- views


@dataclass(frozen=True)
class SegView:
    """SegSample -> {"images": float32 (3, h, w) normalised, "masks": int64 (h', w')}; one
    torchvision v2 pipeline over a tv_tensors.Image and a tv_tensors.Mask, so every geometric
    step moves both alike (masks resized nearest). A class so that it pickles into workers."""

    transform: Callable[[Any], Any]

    def __call__(self, sample: SegSample) -> dict[str, Tensor]:
        image = sample.image
        if isinstance(image, Image.Image):
            image = v2.functional.pil_to_tensor(image)
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(sample.mask))
        return {"images": image, "masks": mask.long()}


def _normalise(data_cfg: EvalDataConfig) -> list[Any]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(data_cfg.mean, data_cfg.std),
    ]


def seg_train_view(
    data_cfg: DataConfig, crop: int, scale: tuple[float, float] = (0.5, 2.0)
) -> SegView:
    """The training view of the linear protocol: the short side resized to a random
    round(crop x r), r ~ U(scale) (image bilinear, mask nearest), normalised, a random crop x crop
    crop (padded with 0 / IGNORE_INDEX where the image is smaller), a horizontal flip
    (data.hflip)."""
    lo, hi = round(crop * scale[0]), round(crop * scale[1])
    return SegView(
        v2.Compose(
            [
                v2.RandomResize(lo, hi + 1, interpolation=v2.InterpolationMode.BILINEAR),
                *_normalise(data_cfg),
                v2.RandomCrop(
                    crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}
                ),
                v2.RandomHorizontalFlip(data_cfg.hflip),
                v2.ToPureTensor(),
            ]
        )
    )


@dataclass(frozen=True)
class ResizeImage:
    """Resize only the image: its short side to `size` (the long side at most 4 x size), the mask
    left at its own size (predictions are scored at the label's size)."""

    size: int

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        resized = v2.functional.resize(
            image, self.size, max_size=4 * self.size, interpolation=v2.InterpolationMode.BILINEAR
        )
        return tv_tensors.wrap(resized, like=image), mask


def seg_eval_view(data_cfg: EvalDataConfig, crop: int) -> SegView:
    """The evaluation view: the image's short side resized to `crop` (long side capped at 4 x
    crop), normalised; the mask untouched."""
    return SegView(v2.Compose([ResizeImage(crop), *_normalise(data_cfg), v2.ToPureTensor()]))
