"""Data: synthetic images, views, per-sample seeding, folders, HF datasets, unreadable files."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from ssl_vit.cli import main as cli_main
from ssl_vit.config import DataConfig
from ssl_vit.data import (
    DataError,
    ImageDataset,
    SkipCounter,
    SyntheticImages,
    build_dataset,
    build_loader,
    collate,
    open_image,
    single_view,
)

# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_deterministic_by_seed_split_and_index():
    a, b = SyntheticImages(20, image_size=32), SyntheticImages(20, image_size=32)
    assert torch.equal(a[7][0], b[7][0])
    assert a[7][0].dtype == torch.uint8 and a[7][0].shape == (3, 32, 32)
    others = [
        a[8][0],
        a[17][0],  # same class as 7
        SyntheticImages(20, image_size=32, split="val")[7][0],
        SyntheticImages(20, image_size=32, seed=1)[7][0],
    ]
    for other in others:
        assert (a[7][0].float() - other.float()).abs().mean() > 10  # out of 255


def test_synthetic_classes_and_labels():
    ds = SyntheticImages(40, image_size=32)
    assert len(ds) == 40 and len(ds.classes) == 10
    assert [ds[i][1] for i in range(40)] == [i % 10 for i in range(40)]
    wide = SyntheticImages(40, num_classes=16, image_size=32)
    assert len(wide.classes) == len(set(wide.classes)) == 16 and wide[15][1] == 15
    for bad in (9, 17):
        with pytest.raises(ValueError, match="num_classes"):
            SyntheticImages(40, num_classes=bad)
    with pytest.raises(ValueError, match="'test'"):
        SyntheticImages(40, split="test")
    with pytest.raises(IndexError):
        ds[40]


def test_synthetic_renders_one_scene_at_any_resolution():
    for size in (32, 97):
        assert SyntheticImages(4, image_size=size)[3][0].shape == (3, size, size)
    # The scene does not depend on the resolution: 64 px pooled to 32 px ~ the 32 px render.
    small = SyntheticImages(20, image_size=32)
    large = SyntheticImages(20, image_size=64)
    for i in range(20):
        pooled = torch.nn.functional.avg_pool2d(large[i][0][None].float(), 2)[0]
        assert (pooled - small[i][0].float()).abs().mean() < 8


def _load(split: str, per_class: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = SyntheticImages(per_class * num_classes, num_classes, image_size=32, split=split)
    images, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(images).float() / 255, torch.tensor(labels)


def _nearest_class_mean(train: tuple, test: tuple, num_classes: int) -> float:
    """Accuracy of nearest class mean (features standardised by their train std)."""
    (ftr, ytr), (fte, yte) = train, test
    means = torch.stack([ftr[ytr == c].mean(0) for c in range(num_classes)])
    std = ftr.std(0) + 1e-6
    pred = torch.cdist(fte / std, means / std).argmin(1)
    return (pred == yte).float().mean().item()


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> colour-, sign- and translation-invariant structure features (N, 64).

    Each image is projected on its main colour axis (foreground vs background), then the
    magnitude of its 2-D Fourier transform (centred) is pooled on an 8x8 grid.
    """
    centred = (x - x.mean((2, 3), keepdim=True)).flatten(2)  # N, 3, HW
    axis = torch.linalg.eigh(centred @ centred.transpose(1, 2)).eigenvectors[..., -1]
    gray = torch.einsum("nc,ncp->np", axis, centred)
    gray = (gray / gray.std(1, keepdim=True)).view(len(x), *x.shape[2:])  # contrast-free
    spectrum = torch.fft.fftshift(torch.fft.fft2(gray).abs(), dim=(-2, -1))
    return torch.nn.functional.avg_pool2d(spectrum[:, None], 4).flatten(1).log1p()


@pytest.mark.parametrize("num_classes", [10, 16])
def test_synthetic_class_is_structure_not_colour(num_classes):
    (xtr, ytr), (xte, yte) = _load("train", 20, num_classes), _load("val", 10, num_classes)
    chance = 1 / num_classes
    colour = _nearest_class_mean((xtr.mean((2, 3)), ytr), (xte.mean((2, 3)), yte), num_classes)
    structure = _nearest_class_mean((_spectrum(xtr), ytr), (_spectrum(xte), yte), num_classes)
    assert colour < chance + 0.05  # mean colour carries no class information
    assert structure > chance + 0.4  # a translation-invariant structure feature does


# ---------------------------------------------------------------------------------------------
# views


def test_single_view_shape_dtype_and_normalisation():
    cfg = DataConfig(mean=(0.5, 0.25, 0.125), std=(0.5, 0.25, 0.2))
    rgb = (200, 100, 50)
    expected = (torch.tensor(rgb) / 255 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    tensor = torch.tensor(rgb, dtype=torch.uint8)[:, None, None].expand(3, 48, 40).contiguous()
    for image in (tensor, Image.new("RGB", (40, 48), rgb)):
        out = single_view(cfg, 32)(image)
        assert list(out) == ["images"] and type(out["images"]) is torch.Tensor
        assert out["images"].shape == (3, 32, 32) and out["images"].dtype == torch.float32
        torch.testing.assert_close(out["images"], expected[:, None, None].expand(3, 32, 32))


def test_single_view_crops_and_flips():
    image = SyntheticImages(1, image_size=32)[0][0]
    full = DataConfig(crop_scale=(1.0, 1.0), hflip=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    kept = single_view(full, 32)(image)["images"]
    torch.testing.assert_close(kept, image.float() / 255)  # whole image, same size: untouched
    flipped = single_view(dataclasses.replace(full, hflip=1.0), 32)(image)["images"]
    torch.testing.assert_close(flipped, kept.flip(-1))
    view = single_view(DataConfig(crop_scale=(0.2, 0.5)), 32)
    assert not torch.equal(view(image)["images"], view(image)["images"])


# ---------------------------------------------------------------------------------------------
# dataset items, seeding and the loader


def _synthetic(size: int = 16, **kw) -> tuple[DataConfig, ImageDataset]:
    cfg = DataConfig(synthetic_size=size, crop_scale=(0.2, 1.0))
    return cfg, build_dataset(cfg, single_view(cfg, 24), image_size=32, **kw)


def _epoch(ds, num_workers: int, shuffle: bool = False, seed: int = 0) -> dict[int, torch.Tensor]:
    loader = build_loader(
        ds, 6, shuffle=shuffle, drop_last=False, num_workers=num_workers, pin_memory=True, seed=seed
    )
    return {int(i): img for b in loader for i, img in zip(b["index"], b["images"], strict=True)}


def test_items_and_collate():
    cfg, ds = _synthetic(12)
    item = ds[5]
    assert set(item) == {"images", "labels", "index", "skipped"}
    assert item["labels"] == 5 and item["index"] == 5 and item["skipped"] == []
    assert ds.classes == list(SyntheticImages(1).classes)
    assert len(build_dataset(cfg, single_view(cfg, 24), "val")) == 10  # max(12 // 10, 10 classes)
    batch = collate([ds[i] for i in (3, 4, 1)])
    assert batch["images"].shape == (3, 3, 24, 24)
    assert batch["labels"].tolist() == [3, 4, 1] and batch["labels"].dtype == torch.long
    assert batch["index"].tolist() == [3, 4, 1] and batch["skipped"] == []
    crops = [
        {
            "crops": [torch.full((3, 4, 4), k), torch.full((3, 2, 2), -k)],
            "labels": -1,
            "index": k,
            "skipped": [f"bad{k}"] * k,
        }
        for k in range(3)
    ]
    batch = collate(crops)
    assert [c.shape for c in batch["crops"]] == [(3, 3, 4, 4), (3, 3, 2, 2)]
    assert batch["crops"][1][:, 0, 0, 0].tolist() == [0, -1, -2]
    assert batch["skipped"] == ["bad1", "bad2", "bad2"] and batch["labels"].tolist() == [-1] * 3


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    _, ds = _synthetic(seed=3)
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first = _epoch(ds, num_workers=0)
    assert torch.equal(torch.get_rng_state(), rng[0])  # the training process's RNGs are untouched
    assert random.getstate() == rng[1] and np.array_equal(np.random.get_state()[1], rng[2])
    assert sorted(first) == list(range(16))
    workers = _epoch(ds, num_workers=2)
    shuffled = _epoch(ds, num_workers=0, shuffle=True, seed=5)
    for i in range(16):
        assert torch.equal(first[i], workers[i]) and torch.equal(first[i], shuffled[i])
    ds.set_epoch(1)
    second = _epoch(ds, num_workers=2)
    assert all((first[i] - second[i]).abs().mean() > 0.05 for i in range(16))
    _, other_seed = _synthetic(seed=4)
    assert not torch.equal(_epoch(other_seed, 0)[0], first[0])
    ds.set_epoch(0)
    assert all(torch.equal(first[i], img) for i, img in _epoch(ds, num_workers=0).items())


def test_loader_order_comes_from_its_own_seed():
    _, ds = _synthetic(size=32)

    def order(seed: int) -> list[int]:
        loader = build_loader(
            ds, 8, shuffle=True, drop_last=True, num_workers=0, pin_memory=True, seed=seed
        )
        state = torch.get_rng_state()
        it = iter(loader)
        assert torch.equal(torch.get_rng_state(), state)
        assert loader.pin_memory == torch.cuda.is_available()
        return [i for b in it for i in b["index"].tolist()]

    assert order(0) == order(0) != order(1)
    assert sorted(order(0)) == list(range(32))


# ---------------------------------------------------------------------------------------------
# image folders


def _png(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(
        SyntheticImages(seed + 1, image_size=size)[seed][0].permute(1, 2, 0).numpy()
    )


def _write(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _png(seed).save(path)
    return path


def _folder_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), crop_scale=(0.5, 1.0), **kw)


def test_image_folder_with_and_without_class_folders(tmp_path):
    for k, cls in enumerate(["zebra", "ant", "moth"]):
        for j in range(k + 1):
            _write(tmp_path / "labeled" / cls / f"{j}.{'png' if j % 2 else 'jpg'}", k * 10 + j)
    (tmp_path / "labeled" / "empty_dir").mkdir()
    (tmp_path / "labeled" / "zebra" / "notes.txt").write_text("not an image")
    cfg = _folder_cfg(tmp_path / "labeled")
    ds = build_dataset(cfg, single_view(cfg, 16))
    assert ds.classes == ["ant", "moth", "zebra"]
    assert [Path(f).parent.name for f in ds.source.files] == ["ant"] * 2 + ["moth"] * 3 + ["zebra"]
    assert [ds[i]["labels"] for i in range(len(ds))] == [0, 0, 1, 1, 1, 2]
    assert ds[0]["images"].shape == (3, 16, 16)

    for j, sub in enumerate(["", "a", "a/b", "c"]):
        _write(tmp_path / "flat" / sub / f"img{j}.PNG", j)
    cfg = _folder_cfg(tmp_path / "flat")
    ds = build_dataset(cfg, single_view(cfg, 16))
    assert len(ds) == 4 and ds.classes == []
    assert [ds[i]["labels"] for i in range(4)] == [-1] * 4


def test_image_folder_picks_the_split_subfolder(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for j in range(n):
            _write(tmp_path / split / "cls" / f"{j}.png", j)
    cfg = _folder_cfg(tmp_path)
    assert len(build_dataset(cfg, single_view(cfg, 16))) == 3
    assert len(build_dataset(cfg, single_view(cfg, 16), "val")) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found in .*empty"):
        build_dataset(_folder_cfg(tmp_path / "empty"), single_view(cfg, 16))


def _corrupt_files(root: Path) -> dict[str, Path]:
    """Three unreadable files, one of each kind."""
    buf = io.BytesIO()
    _png(0, size=64).save(buf, format="JPEG")
    files = {
        "garbage": (root / "garbage.jpg", np.random.default_rng(0).bytes(500)),
        "truncated": (root / "truncated.jpg", buf.getvalue()[:-200]),
        "empty": (root / "empty.png", b""),
    }
    for path, data in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {k: path for k, (path, _) in files.items()}


def test_each_corrupt_file_is_unreadable(tmp_path, monkeypatch):
    bad = _corrupt_files(tmp_path)
    for path in bad.values():
        with pytest.raises(Exception):  # noqa: B017 - PIL raises several types
            open_image(path)
    # The truncated JPEG is a real truncation: PIL would silently grey-fill it if allowed to.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert open_image(bad["truncated"]).size == (64, 64)


def test_corrupt_images_are_replaced_reported_and_logged(tmp_path, caplog):
    root = tmp_path / "images"
    for j in range(50):
        _write(root / f"img_{j:02d}.{'png' if j % 2 else 'jpg'}", j)
    # Sorted: empty.png, garbage.jpg (neighbours), 50 good, truncated.jpg (wraps around to 0).
    bad = {str(p) for p in _corrupt_files(root).values()}
    cfg = _folder_cfg(root)
    ds = build_dataset(cfg, single_view(cfg, 16))
    assert len(ds) == 53
    loader = build_loader(
        ds, 8, shuffle=True, drop_last=False, num_workers=2, pin_memory=False, seed=0
    )
    counter = SkipCounter(cfg.max_bad_fraction, min_seen=10)
    with caplog.at_level(logging.WARNING):
        for epoch in range(2):
            ds.set_epoch(epoch)
            sizes, indices, skipped = [], [], []
            for batch in loader:
                sizes.append(len(batch["images"]))
                indices += batch["index"].tolist()
                skipped += batch["skipped"]
                counter.update(batch["skipped"], len(batch["index"]) - len(batch["skipped"]))
                assert batch["images"].shape[1:] == (3, 16, 16)
            assert sizes == [8] * 6 + [5] and sorted(indices) == list(range(53))
            assert Counter(skipped) == Counter(bad)  # each bad file exactly once per epoch
    assert counter.total == 6 and counter.seen == 106
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # each path logged once, not once per epoch
    assert {p for p in bad if any(p in w for w in warnings)} == bad
    assert any("(2 so far)" in w for w in warnings)


def test_mostly_corrupt_data_is_an_error(tmp_path):
    root = tmp_path / "bad_images"
    for j in range(4):
        _write(root / f"good_{j}.png", j)
    for j in range(12):
        (root / f"bad_{j:02d}.jpg").write_bytes(b"not a jpeg" * j)
    cfg = _folder_cfg(root)
    with pytest.raises(DataError, match=r"12 of 16 sampled images in .*bad_images could not be"):
        build_dataset(cfg, single_view(cfg, 16))
    counter = SkipCounter(0.5, min_seen=10)
    counter.update(["a", "b", "c"], 2)  # 3 of 5: bad, but too few seen to judge
    with pytest.raises(DataError, match=r"most images fail: 9 of 12 .*e\.g\. a, b, c"):
        counter.update(["d", "e", "f", "g", "h", "i"], 1)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (built locally, never downloaded)


def _hf_dataset(n: int, labels: bool, corrupt_row: int | None = None):
    import datasets

    images = []
    for j in range(n):
        buf = io.BytesIO()
        _png(j).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    if corrupt_row is not None:
        images[corrupt_row] = {"bytes": b"garbage bytes", "path": None}
    columns = {"image": images, "caption": [f"image {j}" for j in range(n)]}
    features = {"image": datasets.Image(), "caption": datasets.Value("string")}
    if labels:
        columns["label"] = [j % 3 for j in range(n)]
        features["label"] = datasets.ClassLabel(names=["cat", "dog", "owl"])
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def test_saved_hf_dataset_loads_with_and_without_labels(tmp_path):
    # paths as str: datasets 2.19's save_to_disk takes no Path (users' own calls, not ours)
    _hf_dataset(7, labels=True, corrupt_row=3).save_to_disk(str(tmp_path / "labeled"))
    cfg = _folder_cfg(tmp_path / "labeled")
    ds = build_dataset(cfg, single_view(cfg, 16))
    assert len(ds) == 7 and ds.classes == ["cat", "dog", "owl"]
    items = [ds[i] for i in range(7)]
    assert [it["labels"] for it in items] == [0, 1, 2, 1, 1, 2, 0]  # row 3 replaced by row 4
    assert items[3]["skipped"] == [f"{tmp_path / 'labeled'}[3]"]
    assert items[0]["images"].shape == (3, 16, 16)

    _hf_dataset(4, labels=False).save_to_disk(str(tmp_path / "unlabeled"))
    cfg = _folder_cfg(tmp_path / "unlabeled")
    ds = build_dataset(cfg, single_view(cfg, 16))
    assert [ds[i]["labels"] for i in range(4)] == [-1] * 4 and ds.classes == []

    cfg = _folder_cfg(tmp_path / "labeled", image_column="img")
    with pytest.raises(DataError, match=r"'img'.*\['image', 'caption', 'label'\]"):
        build_dataset(cfg, single_view(cfg, 16))
    cfg = _folder_cfg(tmp_path / "labeled", label_column="caption")
    with pytest.raises(DataError, match="label column 'caption'.*not integer class ids"):
        build_dataset(cfg, single_view(cfg, 16))


def test_saved_hf_dataset_dict_selects_the_split(tmp_path):
    import datasets

    splits = {"train": _hf_dataset(5, True), "validation": _hf_dataset(2, True)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))  # str: as above
    cfg = _folder_cfg(tmp_path / "dd")
    assert len(build_dataset(cfg, single_view(cfg, 16))) == 5
    assert len(build_dataset(cfg, single_view(cfg, 16), "validation")) == 2
    with pytest.raises(DataError, match=r"no split 'test'.*\['train', 'validation'\]"):
        build_dataset(cfg, single_view(cfg, 16), "test")


def test_hub_dataset_goes_through_load_dataset(monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no reachability check
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if split != "train":
            raise ValueError(f"Unknown split \"{split}\". Should be one of ['train'].")
        return _hf_dataset(3, labels=True)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataConfig(path="hf:someone/pets", crop_scale=(0.5, 1.0))
    ds = build_dataset(cfg, single_view(cfg, 16))
    assert calls == [("someone/pets", "train")] and ds[2]["labels"] == 2
    with pytest.raises(DataError, match="hf:someone/pets.*Unknown split"):
        build_dataset(cfg, single_view(cfg, 16), "val")


def test_unreachable_hub_fails_at_once_in_one_line_leaving_no_run_directory(
    tmp_path, monkeypatch, capsys
):
    """Offline, a Hub dataset is one request and one line, before any run directory exists
    (before: datasets' five retries over ~40 s, a 66-line ConnectionError, config.json left)."""
    import datasets
    from huggingface_hub import constants, utils

    class Offline:
        def head(self, url, timeout):
            raise ConnectionError(f"cannot resolve {url}")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # whatever the caller's shell set
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(utils, "get_session", lambda: Offline())
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("no retries"))
    run = tmp_path / "run"
    args = ["train", "--data.path", "hf:someone/pets", "--train.output_dir", str(run)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: hf:someone/pets: cannot load it from the")
    assert "ConnectionError: cannot resolve" in err[0] and "HF_HUB_OFFLINE=1" in err[0]
    assert not run.exists()


@pytest.mark.parametrize(
    "offline", [("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"), ("HF_DATASETS_OFFLINE",)]
)
def test_offline_mode_fails_in_one_line_that_does_not_ask_for_it_again(tmp_path, offline):
    """With offline mode set, as on many clusters, a Hub dataset not in the (empty) cache is one
    line, exit status 2, no run directory, and no advice to set what is set (before: "... or set
    HF_HUB_OFFLINE=1 to read the local cache"). A subprocess: `datasets` reads the variables at
    import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(tmp_path / "hf"), **dict.fromkeys(offline, "1")}
    run = tmp_path / "run"
    args = ["train", "--data.path", "hf:someone/pets", "--train.output_dir", str(run)]
    done = subprocess.run(
        [sys.executable, "-m", "ssl_vit", *args], env=env, capture_output=True, text=True
    )
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert err[0].startswith(
        "error: hf:someone/pets: not in the local cache, and offline mode is set (HF_HUB_OFFLINE "
        "/ HF_DATASETS_OFFLINE) (ConnectionError: "
    )
    assert err[0].endswith(
        "Load it once where the Hub can be reached, or use a copy saved with save_to_disk "
        "(data.path DIR)"
    )
    assert not run.exists()


def test_data_package_imports_without_hugging_face_datasets():
    code = (
        "import sys; sys.modules['datasets'] = None\n"
        "from ssl_vit.config import DataConfig\n"
        "from ssl_vit.data import build_dataset, single_view\n"
        "cfg = DataConfig(synthetic_size=4)\n"
        "print(build_dataset(cfg, single_view(cfg, 16), image_size=16)[0]['images'].shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch.Size([3, 16, 16])"
