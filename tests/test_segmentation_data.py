"""Segmentation data: each layout read from tiny files written here (ADE20K, VOC, a pair of
folders with classes.json, a saved Hugging Face dataset), the built-in synthetic masks, image and
mask kept aligned by every augmentation, and each bad input refused by one message naming it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.config import DataConfig
from ssl_vit.data import DataError, collate
from ssl_vit.data.segmentation import (
    ADE20K_CLASSES,
    IGNORE_INDEX,
    VOC_CLASSES,
    SegSample,
    build_segmentation,
    seg_eval_split,
    seg_eval_view,
    seg_train_view,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), num_workers=0, mean=MEAN, std=STD, **kw)


def raw(sample: SegSample) -> dict:
    """A view that keeps the sample as read: image uint8 (3, H, W), mask (H, W)."""
    image = sample.image
    if isinstance(image, Image.Image):
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    return {"images": image, "masks": sample.mask.long()}


def write_pair(image_path, mask_path, mask: np.ndarray, size=None, mode="L", palette=None):
    """An RGB image whose red channel is 10 x the stored mask value, and the mask PNG."""
    h, w = mask.shape
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.stack([mask * 10 % 256, np.full_like(mask, 7), np.zeros_like(mask)], -1)
    image = Image.fromarray(rgb.astype(np.uint8))
    if size is not None:
        image = image.resize(size)
    image.save(image_path)
    m = Image.fromarray(mask.astype(np.uint8), mode="L")
    if mode == "P":
        m = m.convert("P")
        m.putpalette(palette)
    m.save(mask_path)


def masks(seed: int, n: int, values, shape=(6, 8)) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [g.choice(values, size=shape) for _ in range(n)]


def test_ade20k_layout_reduces_zero_label_and_names_its_150_classes(tmp_path):
    stored = masks(0, 3, [0, 1, 2, 150, 255])
    for i, m in enumerate(stored):
        split = "training" if i < 2 else "validation"
        name = f"ADE_{split}_{i:08d}"
        write_pair(
            tmp_path / "images" / split / f"{name}.jpg",
            tmp_path / "annotations" / split / f"{name}.png",
            m,
        )
    d = cfg(tmp_path)
    assert seg_eval_split(d) == "validation"  # auto; train is read as 'training'
    train = build_segmentation(d, raw)
    assert len(train) == 2 and len(ADE20K_CLASSES) == 150
    assert train.classes == list(ADE20K_CLASSES) and train.classes[:3] == [
        "wall",
        "building",
        "sky",
    ]
    want = np.where(stored[0] == 0, 255, np.where(stored[0] == 255, 255, stored[0] - 1))
    assert torch.equal(train[0]["masks"], torch.from_numpy(want))
    val = build_segmentation(d, raw, "validation", classes=train.classes)
    assert len(val) == 1 and set(val[0]["masks"].unique().tolist()) <= {0, 1, 149, 255}
    with pytest.raises(DataError, match="label 150 outside the 150 classes"):  # not reduced
        build_segmentation(cfg(tmp_path, reduce_zero_label="no"), raw)


def test_voc_layout_reads_palette_masks_and_its_split_lists(tmp_path):
    palette = [v for i in range(256) for v in (i, 255 - i, 3 * i % 256)]
    stored = masks(1, 3, [0, 5, 20, 255])
    ids = ["2007_000032", "2007_000039", "2007_000063"]
    for i, m in zip(ids, stored, strict=True):
        write_pair(
            tmp_path / "JPEGImages" / f"{i}.jpg",
            tmp_path / "SegmentationClass" / f"{i}.png",
            m,
            mode="P",
            palette=palette,
        )
    lists = tmp_path / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text(f"{ids[2]}\n{ids[0]}\n")
    (lists / "val.txt").write_text(f"{ids[1]}\n")
    d = cfg(tmp_path)
    assert seg_eval_split(d) == "val"
    train = build_segmentation(d, raw)
    assert train.classes == VOC_CLASSES and len(VOC_CLASSES) == 21
    assert train.source.images[0].endswith(f"{ids[2]}.jpg")  # the list's order
    assert torch.equal(train[0]["masks"], torch.from_numpy(stored[2]))  # indices, 255 kept
    val = build_segmentation(d, raw, "val", classes=train.classes)
    assert torch.equal(val[0]["masks"], torch.from_numpy(stored[1]))


def test_folder_pair_with_class_json_drops_ignored_classes_and_renumbers(tmp_path):
    stored = masks(2, 2, [0, 1, 2, 3])
    for split, m in zip(("train", "val"), stored, strict=True):
        write_pair(tmp_path / split / "images" / "a.png", tmp_path / split / "masks" / "a.png", m)
    spec = {"classes": ["sky", "unlabelled", "road", "car"], "ignore": [1]}
    (tmp_path / "classes.json").write_text(json.dumps(spec))
    d = cfg(tmp_path)
    train = build_segmentation(d, raw)
    assert train.classes == ["sky", "road", "car"]
    lut = torch.tensor([0, IGNORE_INDEX, 1, 2])
    assert torch.equal(train[0]["masks"], lut[torch.from_numpy(stored[0])])
    assert seg_eval_split(d) == "val"


def test_folder_pair_without_json_counts_its_classes(tmp_path):
    m = np.array([[0, 4], [255, 2]])
    write_pair(tmp_path / "images" / "x.png", tmp_path / "masks" / "x.png", m)
    data = build_segmentation(cfg(tmp_path), raw)
    assert data.classes == ["0", "1", "2", "3", "4"]  # the largest label + 1; 255 ignored
    assert torch.equal(data[0]["masks"], torch.from_numpy(m))


def test_saved_hugging_face_dataset_with_a_mask_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    stored = masks(3, 3, [0, 1, 2, 3])

    def rows(ms):
        images = [Image.fromarray(np.full((*m.shape, 3), 9, np.uint8)) for m in ms]
        return {"image": images, "seg": [Image.fromarray(m.astype(np.uint8)) for m in ms]}

    features = datasets.Features({"image": datasets.Image(), "seg": datasets.Image()})
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows(stored[:2]), features=features),
        validation=datasets.Dataset.from_dict(rows(stored[2:]), features=features),
    )
    dd.save_to_disk(str(tmp_path / "hf"))
    d = cfg(tmp_path / "hf", mask_column="seg", reduce_zero_label="yes")
    assert seg_eval_split(d) == "validation"
    train = build_segmentation(d, raw)
    assert train.classes == ["0", "1", "2"]  # labels 1..3 reduced to 0..2
    want = np.where(stored[1] == 0, 255, stored[1] - 1)
    assert torch.equal(train[1]["masks"], torch.from_numpy(want))
    with pytest.raises(DataError, match="no column 'annotation' \\(data.mask_column\\)"):
        build_segmentation(cfg(tmp_path / "hf"), raw)


def test_synthetic_masks_are_the_shape_drawn_there():
    """Mask from the renderer's own cover; checked against the image: the pixels the mask calls
    shape and background are two colours of the palette far apart, and each pixel is nearer the
    colour of the side its mask gives."""
    data = build_segmentation(cfg("synthetic", synthetic_size=20), raw, image_size=48)
    assert data.classes[0] == "background" and len(data.classes) == 11
    for i in (0, 3, 7):
        item = data[i]
        image, mask = item["images"].float() / 255, item["masks"]
        assert set(mask.unique().tolist()) == {0, i % 10 + 1}
        fg, bg = image[:, mask > 0], image[:, mask == 0]
        assert (fg.mean(1) - bg.mean(1)).abs().max() > 0.5
        to_fg = (image - fg.mean(1)[:, None, None]).norm(dim=0)
        to_bg = (image - bg.mean(1)[:, None, None]).norm(dim=0)
        assert ((to_fg < to_bg) == (mask > 0)).float().mean() > 0.97  # edges: noise may tip


def test_digits_are_ink_labelled_digit_plus_one():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    data = build_segmentation(cfg("digits"), raw, image_size=16)
    assert data.classes == ["background", *map(str, range(10))] and len(data) == 1437
    item, digits = data[5], load_digits()
    want = torch.from_numpy(digits.images[5] >= 8).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(item["masks"] > 0, want)
    assert set(item["masks"].unique().tolist()) == {0, int(digits.target[5]) + 1}


def coded(seed: int, size=(40, 56), block=8) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose colour encodes its class block by block, and that mask (derived from it)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, 7, (size[0] // block, size[1] // block), generator=g)
    mask = grid.repeat_interleave(block, 0).repeat_interleave(block, 1)
    image = (mask * 36 + 10).to(torch.uint8).expand(3, -1, -1).clone()
    image[1] = 255 - image[1]
    return image, mask.to(torch.uint8)


def decode(images: torch.Tensor) -> torch.Tensor:
    """The class each pixel's colour says (a normalised image back to 0..255)."""
    pixels = images[0] * STD[0] + MEAN[0]
    return ((pixels * 255 - 10) / 36).round().long()


@pytest.mark.parametrize("seed", range(6))
def test_every_augmentation_keeps_image_and_mask_aligned(seed):
    """Random scale (both below and above 1: padding), crop and flip: wherever the mask is not
    ignored it is the class the augmented image's colour encodes (bilinear blends only at block
    edges); the padding is 255 in the mask and 0 (the mean colour) in the image."""
    image, mask = coded(seed)
    view = seg_train_view(cfg("synthetic"), 48, (0.5, 2.0))
    torch.manual_seed(seed)
    out = view(SegSample(image, mask))
    x, m = out["images"], out["masks"]
    assert x.shape == (3, 48, 48) and m.shape == (48, 48) and m.dtype == torch.long
    valid = m != IGNORE_INDEX
    assert valid.float().mean() > 0.2
    assert (decode(x)[valid] == m[valid]).float().mean() > 0.85
    assert (x[:, ~valid] == 0).all()
    flipped = decode(x.flip(-1))  # a misaligned flip agrees far less
    assert (flipped[valid] == m[valid]).float().mean() < 0.6 or (m == m.flip(-1)).all()


def test_eval_view_resizes_the_image_to_the_crop_and_keeps_the_mask():
    image, mask = coded(0, (40, 96))
    out = seg_eval_view(cfg("synthetic"), 24)(SegSample(image, mask))
    assert out["images"].shape == (3, 24, 57) and torch.equal(out["masks"], mask.long())


def test_a_batch_stacks_images_and_masks():
    data = build_segmentation(
        cfg("synthetic", synthetic_size=10), seg_train_view(cfg("s"), 32), image_size=32
    )
    batch = collate([data[i] for i in range(3)])
    assert batch["images"].shape == (3, 3, 32, 32) and batch["masks"].shape == (3, 32, 32)


def test_bad_input_is_refused_naming_the_file(tmp_path):
    # an image without a mask
    root = tmp_path / "nomask"
    write_pair(root / "images" / "a.png", root / "masks" / "a.png", np.zeros((4, 4)))
    Image.new("RGB", (4, 4)).save(root / "images" / "b.png")
    with pytest.raises(DataError, match=f"{root / 'images' / 'b.png'}: an image without a mask"):
        build_segmentation(cfg(root), raw)
    # a mask of another size than its image
    root = tmp_path / "size"
    write_pair(root / "images" / "a.png", root / "masks" / "a.png", np.zeros((4, 6)), size=(6, 5))
    with pytest.raises(
        DataError, match=f"{root / 'masks' / 'a.png'}: mask of 6x4 pixels, its image 6x5"
    ):
        build_segmentation(cfg(root), raw)
    # a label outside the classes, read while training (not skipped as an unreadable image)
    root = tmp_path / "label"
    write_pair(root / "images" / "a.png", root / "masks" / "a.png", np.zeros((4, 4)))
    write_pair(root / "images" / "b.png", root / "masks" / "b.png", np.full((4, 4), 3))
    (root / "classes.json").write_text(json.dumps(["bg", "fg"]))
    data = build_segmentation(cfg(root), raw)
    with pytest.raises(DataError, match=f"{root / 'masks' / 'b.png'}: label 3 outside the 2 "):
        data[1]
