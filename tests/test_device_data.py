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
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ssl_vit.config import DataConfig
from ssl_vit.data import (
    Crop,
    DeviceView,
    SyntheticImages,
    batch_generator,
    build_dataset,
    build_loader,
    decode,
    device,
    device_single_view,
    encoded_dataset,
    multi_crop,
    open_image,
    sample_crops,
    seeded,
    single_view,
)
from ssl_vit.data.device import CropParams, EncodedSource, augment_crop, device_view, normalize
from ssl_vit.data.device.crops import resized_crops
from ssl_vit.data.transforms import BLUR_SIGMA, JITTER, GaussianBlur, crop_transform

from tolerances import ROUNDING

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


def _no_colour(boxes: torch.Tensor, flips: torch.Tensor) -> CropParams:
    """Draws with the given boxes and flips and no photometric augmentation."""
    b = len(boxes)
    off = torch.zeros(b, dtype=torch.bool)
    return CropParams(boxes, flips, off, torch.arange(4).repeat(b, 1), torch.ones(b, 4), off,
                      off, torch.ones(b), off)  # fmt: skip


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
    norm = data_cfg.mean, data_cfg.std
    for batch_params in params:
        boxes = torch.tensor([p[:4] for p in batch_params])
        flips = torch.tensor([bool(p[4]) for p in batch_params])
        draws = _no_colour(boxes, flips)
        out = normalize(augment_crop(images, Crop(SIZE, SCALE), draws, interpolation), *norm)
        assert out.shape == (len(images), 3, SIZE, SIZE) and out.dtype == torch.float32
        for k, (path, image, p) in enumerate(
            zip(_files(folder), images, batch_params, strict=True)
        ):
            view = _forced_single_view(data_cfg, *p)
            torch.testing.assert_close(out[k], view(image)["images"], **ROUNDING)
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
    ours = sample_crops(torch.tensor([hw] * n), SCALE, batch_generator(0))
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
    ours = sample_crops(torch.tensor([hw] * 8), SCALE, batch_generator(1))
    ref = _torchvision_params(*hw, 8, seed=1)
    if hw != (5, 5):
        assert (ref == ref[0]).all()  # every torchvision draw fell back too
        assert torch.equal(ours, ref)
    top, left, ch, cw = ours.T
    assert (top + ch <= hw[0]).all() and (left + cw <= hw[1]).all()


def test_device_view_is_deterministic_by_generator_seed(folder: Path):
    images = _decoded(folder)
    view = device_single_view(DataConfig(), SIZE)
    a = view(images, batch_generator(0, 0, 0))
    b = view(images, batch_generator(0, 0, 0))
    c = view(images, batch_generator(0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    flips = [view.params(images, batch_generator(s))[0].flip[0] for s in range(40)]
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
    out = device_single_view(data_cfg, SIZE).apply(batch, batch_generator(0), "cpu")
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
    out = DeviceView("images", (Crop(SIZE, SCALE),)).apply(batch, batch_generator(0), "cpu")
    assert out["skipped"] == [str(bad)] and out["labels"].tolist() == [0, 1, 3, 3, 4]
    assert out["images"].shape == (5, 3, SIZE, SIZE) and torch.isfinite(out["images"]).all()


def test_synthetic_source_is_encoded_losslessly():
    dataset = build_dataset(DataConfig(synthetic_size=4), lambda x: {}, image_size=24)
    encoded = encoded_dataset(dataset)
    for i in range(2):
        item = encoded[i]
        (image,) = decode([item["encoded"].data], "cpu")
        assert torch.equal(image, dataset.source[i][0]) and item["labels"] == i


# ---------------------------------------------------------------------------------------------
# DINO's multi-crop on the device

DINO_CROPS = (
    Crop(SIZE, (0.25, 1.0), jitter=0.8, grayscale=0.2, blur=1.0),
    Crop(SIZE, (0.25, 1.0), jitter=0.8, grayscale=0.2, blur=0.1, solarize=0.2),
    Crop(16, (0.05, 0.25), jitter=0.8, grayscale=0.2, blur=0.5),
)


def _batch(n: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): synthetic images (flat colours, edges) plus noise (gradients)."""
    images = torch.stack([SyntheticImages(n, image_size=size)[i][0] for i in range(n)])
    noise = torch.randint(-40, 40, images.shape, generator=torch.Generator().manual_seed(seed))
    return (images.int() + noise).clamp(0, 255).to(torch.uint8)


def _assert_levels(ours: torch.Tensor, ref: torch.Tensor, equal: float = 0.999) -> None:
    """uint8 results within one level, equal on at least `equal` of the values."""
    diff = (ours.int() - ref.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() >= equal, (
        diff.max(),
        diff.float().mean(),
    )


def test_colour_ops_equal_torchvision_uint8_kernels_per_image():
    """Each batched op with its own factor per image against torchvision's kernel per image."""
    x = _batch(12)
    g = torch.Generator().manual_seed(0)
    lo, hi = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    factors = lo + (hi - lo) * torch.rand(12, 4, generator=g)
    sigma = 0.1 + 1.9 * torch.rand(12, generator=g)
    refs = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for index, (op, ref) in enumerate(zip(device.JITTER_OPS, refs, strict=True)):
        ours = op(x.clone(), factors[:, index])
        expected = torch.stack([ref(x[k], float(factors[k, index])) for k in range(12)])
        _assert_levels(ours, expected, equal=0.9999)
    blurred = device.gaussian_blur(x, sigma)
    expected = torch.stack(
        [F.gaussian_blur(x[k], [13, 13], [float(sigma[k])] * 2) for k in range(12)]
    )
    _assert_levels(blurred, expected)  # separable vs 2-D kernel: float rounding only
    assert (blurred.int() - x.int()).abs().float().mean() > 5  # and it does blur


def _forced_crop(crop: Crop, data_cfg: DataConfig, p: CropParams, k: int) -> v2.Compose:
    """transforms.crop_transform(crop) itself, with image k's draws forced."""
    t = crop_transform(crop, data_cfg)
    rrc, flip, jitter, gray, blur, solarize = t.transforms[:6]
    top, left, h, w = p.boxes[k].tolist()
    rrc.make_params = lambda flat_inputs: dict(top=top, left=left, height=h, width=w)
    flip.p, jitter.p, gray.p, solarize.p = (
        float(m[k]) for m in (p.flip, p.jitter, p.gray, p.solarize)
    )
    b, c, s, hue = p.factors[k].tolist()
    order = p.order[k]
    jitter.transforms[0].make_params = lambda flat_inputs: dict(
        fn_idx=order, brightness_factor=b, contrast_factor=c, saturation_factor=s, hue_factor=hue
    )
    assert isinstance(blur, GaussianBlur) and blur.p == crop.blur
    sigma = float(p.sigma[k])
    t.transforms[4] = (
        (lambda im: F.gaussian_blur(im, [13, 13], [sigma, sigma])) if p.blur[k] else (lambda im: im)
    )
    return t


def test_multi_crop_equals_the_cpu_view_for_the_same_draws():
    """Every crop of every image, all augmentations on: the device batch equals the CPU view's
    transforms (crop_transform, on a uint8 tensor image) with the same draws forced, within one
    uint8 level on under 0.1 % of the values (float rounding of the blur and blends)."""
    data_cfg = DataConfig()
    images = list(_batch(16, size=48))
    view = device_view(data_cfg, "crops", DINO_CROPS)
    params = view.params(images, batch_generator(3))
    for key in ("jitter", "gray", "blur", "solarize"):  # each on and off somewhere
        drawn = torch.cat([getattr(q, key) for q in params])
        assert drawn.any() and not drawn.all(), key
    out = [
        augment_crop(images, c, q, data_cfg.interpolation)
        for c, q in zip(DINO_CROPS, params, strict=True)
    ]
    std = torch.tensor(data_cfg.std)[:, None, None]
    for crop, q, batch in zip(DINO_CROPS, params, out, strict=True):
        assert batch.shape == (16, 3, crop.size, crop.size) and batch.dtype == torch.uint8
        ref = torch.stack([_forced_crop(crop, data_cfg, q, k)(images[k]) for k in range(16)])
        levels = (normalize(batch, data_cfg.mean, data_cfg.std) - ref) * std * 255
        assert levels.abs().max() <= 1 + 1e-3 and (levels.abs() > 0.5).float().mean() < 1e-3
    a = view(images, batch_generator(3))
    assert [t.shape[-1] for t in a] == [SIZE, SIZE, 16]
    assert all(
        torch.equal(x, normalize(y, data_cfg.mean, data_cfg.std))
        for x, y in zip(a, out, strict=True)
    )


def test_multi_crop_draws_follow_the_cpu_view_distributions():
    """Over 4000 images: each augmentation's frequency at its crop's probability, the jitter
    factors in v2.ColorJitter's ranges with their means, every operation equally often at every
    position of the order, sigma in BLUR_SIGMA (all within ~4 standard errors)."""
    n = 4000
    sizes = torch.tensor([[64, 64]] * n)
    jitter = v2.ColorJitter(*JITTER)
    ranges = torch.tensor([jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue])
    for crop in DINO_CROPS:
        p = device.sample_params(crop, sizes, 0.5, batch_generator(7))
        for mask, prob in ((p.flip, 0.5), (p.jitter, crop.jitter), (p.gray, crop.grayscale),
                           (p.blur, crop.blur), (p.solarize, crop.solarize)):  # fmt: skip
            se = max(math.sqrt(prob * (1 - prob) / n), 1e-9)
            assert abs(mask.float().mean() - prob) < 4 * se, (crop, prob)
        lo, hi = ranges[:, 0], ranges[:, 1]
        assert ((p.factors >= lo) & (p.factors <= hi)).all()
        se = (hi - lo) / math.sqrt(12 * n)
        assert ((p.factors.mean(0) - (lo + hi) / 2).abs() < 4 * se).all()
        assert sorted(p.order[0].tolist()) == [0, 1, 2, 3]
        at = torch.stack([(p.order == op).float().mean(0) for op in range(4)])  # (op, position)
        assert ((at - 0.25).abs() < 4 * math.sqrt(0.25 * 0.75 / n)).all()
        assert p.sigma.min() >= BLUR_SIGMA[0] and p.sigma.max() <= BLUR_SIGMA[1]
        assert abs(p.sigma.mean() - sum(BLUR_SIGMA) / 2) < 4 * 1.9 / math.sqrt(12 * n)


def test_multi_crop_output_statistics_match_the_pil_cpu_view():
    """One image, 400 times through each path (the CPU view on PIL, as loader workers run it; the
    device view on its decoded tensor): per crop, the mean over draws of the crop's mean, standard
    deviation and mean horizontal gradient (each channel) and the fraction of gray crops agree
    within 4 standard errors of the difference: the same augmentation distribution end to end."""
    n, data_cfg = 400, DataConfig()
    pil = _image(48, 56, 1)
    cpu = multi_crop(data_cfg, DINO_CROPS)
    with seeded(0):
        cpu_crops = [cpu(pil)["crops"] for _ in range(n)]
    images = [F.pil_to_tensor(pil)] * n
    dev_crops = device_view(data_cfg, "crops", DINO_CROPS)(images, batch_generator(0))
    for k in range(len(DINO_CROPS)):
        a = torch.stack([c[k] for c in cpu_crops])
        b = dev_crops[k]
        for stat in (
            lambda x: x.mean(dim=(2, 3)),
            lambda x: x.std(dim=(2, 3)),
            lambda x: (x[..., 1:] - x[..., :-1]).abs().mean(dim=(2, 3)),  # sharpness: blur
        ):
            sa, sb = stat(a), stat(b)  # (n, 3)
            se = ((sa.var(0) + sb.var(0)) / n).sqrt()
            assert ((sa.mean(0) - sb.mean(0)).abs() < 4 * se).all(), (k, sa.mean(0), sb.mean(0))
        gray_a, gray_b = (_gray_fraction(x, data_cfg) for x in (a, b))
        assert abs(gray_a - gray_b) < 4 * math.sqrt(2 * 0.2 * 0.8 / n), (gray_a, gray_b)


def _gray_fraction(crops: torch.Tensor, data_cfg: DataConfig) -> float:
    """Fraction of normalised crops (n, 3, h, w) whose pixels have R = G = B (to 1 level)."""
    std, mean = (torch.tensor(v)[:, None, None] for v in (data_cfg.std, data_cfg.mean))
    pixels = (crops * std + mean) * 255
    spread = (pixels.amax(1) - pixels.amin(1)).amax(dim=(1, 2))
    return float((spread < 1.5).float().mean())


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_float_route_of_the_crops_equals_torchvision_on_float_images(folder: Path, interpolation):
    """The route the device path takes off the CPU (torchvision's for uint8 on CUDA): each crop
    of the float image resized, clamped, rounded; here on the CPU against RandomResizedCrop's own
    resize of the float image. Within one level of the native uint8 resize of the CPU."""
    images = _decoded(folder)
    boxes = torch.tensor([(3, 5, 20, 30), (10, 2, 30, 25), (0, 0, SIZE, SIZE), (7, 9, 33, 31),
                          (1, 1, 5, 40)])  # fmt: skip  # downscale, upscale, same size, thin
    mode = InterpolationMode(interpolation)
    ours = device.resized_crops_float(images, boxes, SIZE, interpolation)
    for k, (image, box) in enumerate(zip(images, boxes.tolist(), strict=True)):
        ref = F.resized_crop(image.float(), *box, [SIZE, SIZE], mode, antialias=True)
        expected = ref.clamp(0, 255).round().to(torch.uint8)
        assert torch.equal(ours[k], expected), (k, box)
    native = device.resized_crops(images, boxes, SIZE, interpolation)  # CPU: uint8 kernels
    assert (ours.int() - native.int()).abs().max() <= 1


def test_a_twin_is_its_crops_box_and_flip_at_its_own_size_undistorted():
    """Crop.twin (DINOv3's Gram-teacher view): on the device, the crop's own box and flip resized
    to the twin's side, normalised, no colour step; after all the crops. On the CPU (TwinCrop),
    the twin brought down to the crop's size equals the crop (no colour step here) to resampling
    error, far below a twin of another draw."""
    data_cfg = DataConfig()
    crops = (Crop(SIZE, SCALE, jitter=1.0, grayscale=1.0, twin=48), Crop(16, SCALE))
    images = list(_batch(8, size=48))
    view = device_view(data_cfg, "crops", crops)
    params = view.params(images, batch_generator(3))
    out = view(images, batch_generator(3))
    assert [t.shape[-1] for t in out] == [SIZE, 16, 48]
    want = resized_crops(images, params[0].boxes, 48, data_cfg.interpolation)
    want = torch.stack(
        [F.horizontal_flip(x) if f else x for x, f in zip(want, params[0].flip, strict=True)]
    )
    assert params[0].flip.any() and not params[0].flip.all()
    assert torch.equal(out[2], normalize(want, data_cfg.mean, data_cfg.std))
    assert not torch.allclose(F.resize(out[2], [SIZE, SIZE]), out[0], atol=0.5)  # jittered

    flipped = DataConfig(hflip=1.0)
    twin_view = multi_crop(flipped, (Crop(SIZE, SCALE, twin=2 * SIZE), Crop(16, SCALE)))
    image = _image(64, 64, 0)
    gaps = []
    for seed in range(4):
        torch.manual_seed(seed)
        crop, local, twin = twin_view(image)["crops"]
        assert crop.shape == (3, SIZE, SIZE) and twin.shape == (3, 2 * SIZE, 2 * SIZE)
        down = F.resize(twin, [SIZE, SIZE], antialias=True)
        gaps.append((down - crop).abs().mean().item())
        torch.manual_seed(seed + 100)
        other = twin_view(image)["crops"][2]
        gaps.append((F.resize(other, [SIZE, SIZE], antialias=True) - crop).abs().mean().item())
    assert max(gaps[::2]) < 0.1 < min(gaps[1::2])
