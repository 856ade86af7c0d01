"""Device data path (data/device.py), on CPU tensors: bytes dataset, decode, the batched single
view against transforms.single_view, crop sampling against torchvision, determinism, bad files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate.utils import send_to_device
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ssl_vit.config import DataConfig
from ssl_vit.data import (
    DeviceView,
    SyntheticImages,
    augment,
    batch_generator,
    build_dataset,
    build_loader,
    decode,
    device_single_view,
    encoded_dataset,
    open_image,
    sample_crops,
    single_view,
    throughput,
    write_image_folder,
)
from ssl_vit.data.device import EncodedSource

SIZE = 32
SCALE = (0.2, 1.0)


def _image(h: int, w: int, i: int) -> Image.Image:
    """A structured (not noise) RGB image of h x w from the synthetic set."""
    return F.to_pil_image(SyntheticImages(4, image_size=max(h, w))[i][0][:, :h, :w])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two class folders: JPEGs (RGB 48x64, RGB 64x40, grayscale 40x40), PNGs (RGB, RGBA)."""
    root = tmp_path_factory.mktemp("images")
    (root / "a").mkdir()
    (root / "b").mkdir()
    _image(48, 64, 0).save(root / "a" / "0.jpg", quality=90)
    _image(64, 40, 1).save(root / "a" / "1.jpeg", quality=75)
    _image(40, 40, 2).convert("L").save(root / "a" / "2.jpg")
    _image(50, 50, 3).save(root / "b" / "3.png")
    _image(36, 44, 0).convert("RGBA").save(root / "b" / "4.png")
    return root


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _decoded(root: Path) -> list[torch.Tensor]:
    source = EncodedSource(build_dataset(DataConfig(path=str(root)), lambda x: {}).source)
    images = decode([source[i][0].data for i in range(len(source))], "cpu")
    assert all(im is not None for im in images)
    return images  # type: ignore[return-value]


def test_jpeg_and_png_decode_to_rgb_like_pil(folder: Path):
    images = _decoded(folder)
    assert len(images) == 5
    for path, image in zip(_files(folder), images, strict=True):
        pil = F.pil_to_tensor(open_image(str(path)))  # the CPU path's decoder
        assert image.dtype == torch.uint8 and image.shape == pil.shape and image.shape[0] == 3
        # both libjpeg-turbo (islow IDCT) / libpng: identical on this build; allow 1 level
        assert (image.int() - pil.int()).abs().max() <= 1, path


def _forced_single_view(data_cfg: DataConfig, top: int, left: int, h: int, w: int, flip: int):
    """transforms.single_view itself, with its crop box and flip forced."""
    view = single_view(data_cfg, SIZE)
    crop, hflip = view.transform.transforms[:2]
    assert isinstance(crop, v2.RandomResizedCrop) and isinstance(hflip, v2.RandomHorizontalFlip)
    box = dict(top=top, left=left, height=h, width=w)
    crop.make_params = lambda flat_inputs: box
    hflip.p = float(flip)
    return view


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_augment_equals_single_view_for_the_same_params(folder: Path, interpolation: str):
    """Same decoded uint8 tensors, same (top, left, h, w, flip): the batched device path gives
    single_view's output exactly; from PIL images (the CPU path: PIL's fixed-point resampling)
    within one uint8 level, off by one on under half the values."""
    data_cfg = DataConfig(interpolation=interpolation)
    images = _decoded(folder)
    params = [  # full image, downscale, upscale of a small box (flipped), thin box
        [(0, 0, im.shape[1], im.shape[2], 0) for im in images],
        [
            (3, 5, 20, 30, 1),
            (10, 2, 30, 25, 0),
            (0, 0, 8, 10, 1),
            (7, 9, 33, 31, 1),
            (1, 1, 5, 40, 0),
        ],
    ]
    std = torch.tensor(data_cfg.std)[:, None, None]
    for batch_params in params:
        out = augment(images, batch_params, SIZE, interpolation, data_cfg.mean, data_cfg.std)
        assert out.shape == (len(images), 3, SIZE, SIZE) and out.dtype == torch.float32
        for k, (path, image, p) in enumerate(
            zip(_files(folder), images, batch_params, strict=True)
        ):
            view = _forced_single_view(data_cfg, *p)
            torch.testing.assert_close(out[k], view(image)["images"], rtol=0, atol=1e-6)
            from_pil = view(open_image(str(path)))["images"]
            levels = ((out[k] - from_pil) * std * 255).abs()
            assert levels.max() <= 1 + 1e-3 and levels.mean() < 0.5, (path, p)


def _torchvision_params(h: int, w: int, n: int, seed: int) -> torch.Tensor:
    rrc = v2.RandomResizedCrop(SIZE, scale=SCALE)
    image = torch.zeros(1, h, w)
    torch.manual_seed(seed)
    boxes = [rrc.make_params([image]) for _ in range(n)]
    return torch.tensor([[b["top"], b["left"], b["height"], b["width"]] for b in boxes])


@pytest.mark.parametrize("hw", [(256, 256), (200, 400), (480, 120)])
def test_sample_crops_ranges_and_distribution_match_torchvision(hw: tuple[int, int]):
    """Over 4000 draws: boxes inside the image, area fraction in scale and aspect ratio in
    [3/4, 4/3] up to the integer rounding of the sides, and the mean area fraction, log aspect
    ratio and relative position within 0.015 / 0.03 / 0.03 of torchvision's make_params (about
    4 standard errors of the difference of two means)."""
    h, w, n = *hw, 4000
    ours = sample_crops(torch.tensor([hw] * n), SCALE, batch_generator("cpu", 0))
    ref = _torchvision_params(h, w, n, seed=0)
    for p in (ours, ref):
        top, left, ch, cw = p.T
        assert (top >= 0).all() and (left >= 0).all() and (ch >= 1).all() and (cw >= 1).all()
        assert (top + ch <= h).all() and (left + cw <= w).all()
    top, left, ch, cw = ours.T.double()
    frac, ratio = ch * cw / (h * w), cw / ch
    slack = 1 / ch.min() + 1 / cw.min()  # the rounding of each side by <= 0.5 px
    assert frac.min() >= SCALE[0] * (1 - slack) and frac.max() <= SCALE[1]
    assert ratio.min() >= 0.75 * (1 - slack) and ratio.max() <= 4 / 3 * (1 + slack)

    def stats(p: torch.Tensor) -> torch.Tensor:
        top, left, ch, cw = p.T.double()
        rel_top = torch.where(ch < h, top / (h - ch).clamp(min=1), torch.full_like(top, 0.5))
        return torch.stack([(ch * cw / (h * w)).mean(), torch.log(cw / ch).mean(), rel_top.mean()])

    diff = (stats(ours) - stats(ref)).abs()
    assert diff[0] < 0.015 and diff[1] < 0.03 and diff[2] < 0.03, diff


@pytest.mark.parametrize("hw", [(10, 300), (300, 10), (5, 5)])
def test_sample_crops_fallback_is_torchvision_centre_crop(hw: tuple[int, int]):
    """Too elongated for any draw to fit (or a tiny image): the deterministic fallback box."""
    ours = sample_crops(torch.tensor([hw] * 8), SCALE, batch_generator("cpu", 1))
    ref = _torchvision_params(*hw, 8, seed=1)
    if hw != (5, 5):
        assert (ref == ref[0]).all()  # every torchvision draw fell back too
        assert torch.equal(ours, ref)
    top, left, ch, cw = ours.T
    assert (top + ch <= hw[0]).all() and (left + cw <= hw[1]).all()


def test_device_view_is_deterministic_by_generator_seed(folder: Path):
    images = _decoded(folder)
    view = device_single_view(DataConfig(), SIZE)
    a = view(images, batch_generator("cpu", 0, 0, 0))
    b = view(images, batch_generator("cpu", 0, 0, 0))
    c = view(images, batch_generator("cpu", 0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    flips = [view.params(images, batch_generator("cpu", s))[0][4] for s in range(40)]
    assert 0 < sum(flips) < 40  # hflip 0.5


def _loader(dataset: torch.utils.data.Dataset, batch_size: int) -> torch.utils.data.DataLoader:
    return build_loader(
        dataset, batch_size, shuffle=False, drop_last=False, num_workers=0, pin_memory=False, seed=0
    )


def test_encoded_loader_batch_decodes_and_augments(folder: Path):
    data_cfg = DataConfig(path=str(folder))
    dataset = encoded_dataset(build_dataset(data_cfg, single_view(data_cfg, SIZE)))
    batch = next(iter(_loader(dataset, 5)))
    files = _files(folder)
    assert batch["encoded"].paths == [str(f) for f in files]
    for k, f in enumerate(files):
        assert batch["encoded"][k].numpy().tobytes() == f.read_bytes()
    assert batch["labels"].tolist() == [0, 0, 0, 1, 1] and batch["skipped"] == []
    moved = send_to_device(batch, "meta")  # what Accelerate's prepared loader does to a batch
    assert moved["labels"].is_meta and moved["encoded"] is batch["encoded"]  # bytes stay on host
    out = device_single_view(data_cfg, SIZE).apply(batch, batch_generator("cpu", 0))
    assert "encoded" not in out and out["images"].shape == (5, 3, SIZE, SIZE)
    assert out["labels"].tolist() == [0, 0, 0, 1, 1] and out["skipped"] == []
    assert out["images"].mean(dim=(0, 2, 3)).abs().max() < 3  # normalised


def test_undecodable_bytes_are_replaced_and_reported(folder: Path, tmp_path: Path):
    """Bytes that read but do not decode: the slot takes the next image of the batch and its
    label, and the path is reported in "skipped" (as ImageDataset does for unreadable files)."""
    for k, src in enumerate(_files(folder)[:4]):
        (tmp_path / f"{k}.jpg").write_bytes(src.read_bytes())
    bad = tmp_path / "1x.jpg"  # sorts between 1.jpg and 2.jpg
    bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)
    data_cfg = DataConfig(path=str(tmp_path))
    dataset = encoded_dataset(build_dataset(data_cfg, single_view(data_cfg, SIZE)))
    batch = next(iter(_loader(dataset, 5)))
    batch["labels"] = torch.arange(5)  # unlabeled folder: mark the slots
    out = DeviceView(SIZE, SCALE).apply(batch, batch_generator("cpu", 0))
    assert out["skipped"] == [str(bad)] and out["labels"].tolist() == [0, 1, 3, 3, 4]
    assert out["images"].shape == (5, 3, SIZE, SIZE) and torch.isfinite(out["images"]).all()


def test_synthetic_source_is_encoded_losslessly():
    dataset = build_dataset(DataConfig(synthetic_size=4), lambda x: {}, image_size=24)
    encoded = encoded_dataset(dataset)
    for i in range(2):
        item = encoded[i]
        (image,) = decode([item["encoded"].data], "cpu")
        assert torch.equal(image, dataset.source[i][0]) and item["labels"] == i


def test_throughput_measures_both_paths(tmp_path: Path):
    root = write_image_folder(tmp_path, 8, 32)
    m = throughput(root, img_size=16, batch_size=4, num_workers=1, passes=1)  # one worker: IPC
    assert m["images"] == 8 and m["device"] == "cpu"
    assert math.isfinite(m["cpu_img_per_s"]) and m["cpu_img_per_s"] > 0
    assert math.isfinite(m["device_img_per_s"]) and m["device_img_per_s"] > 0
