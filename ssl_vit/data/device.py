"""Decode and augment on the accelerator (`data.decode_on_device`): a data path that keeps up.

Why: MAE ViT-B/16 at 40 % MFU on an H100 eats several thousand img/s, while PIL decode +
RandomResizedCrop manage a few hundred per loader worker. Here loader workers only read the
encoded file bytes; the training process decodes a whole batch with nvJPEG
(`torchvision.io.decode_jpeg(list, device=...)`) and augments it on the device.

Same semantics as the CPU views of transforms.py: MAE's `single_view` (also the linear probe's)
and DINO's `multi_crop`, both built from `Crop`s; DeiT's `supervised_view` is a `Crop` followed by
timm's RandAugment and random erasing (`data.randaugment`). Per crop and image: RandomResizedCrop
(crop.scale, ratio 3/4-4/3, data.interpolation, antialias) with the distribution of torchvision's
`RandomResizedCrop.make_params` (vectorised), flip (p = data.hflip); for DINO then colour jitter
(JITTER, per image its own order and factors), grayscale, Gaussian blur and solarisation, each
with its crop's probability; ToDtype float, Normalize. Every step is batched over the images it
applies to, with torchvision's uint8 tensor formulas, so for the same draws the result is the CPU
view's on a tensor image (tests/test_device_data.py). What differs, by design or by decoder:

* the CPU path works on PIL images: PIL's resampling (within one uint8 level of torch's),
  enhancers, HSV conversion (8-bit hue) and blur (PIL's box-approximated Gaussian), close in
  distribution but not bit-equal (tests/test_device_data.py measures the gap);
* nvJPEG (GPU) and libjpeg-turbo (CPU) may differ by a few levels per pixel; on the CPU this path
  decodes with torchvision's libjpeg-turbo / libpng, like PIL;
* randomness is drawn per batch from a host generator keyed by (seed, epoch, batch, rank)
  (`batch_generator`), not per sample: a resumed run sees the same crops, but they are not those
  of the CPU path for the same seed;
* a file that cannot be read is skipped by `ImageDataset` as before; one whose bytes do not decode
  here is replaced by another image of its batch (with its label) and reported in "skipped".
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn.functional import conv2d, interpolate, pad
from torchvision.io import (
    ImageReadMode,
    decode_image,
    decode_jpeg,
    encode_jpeg,
    encode_png,
    read_file,
)
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ssl_vit.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError, DataConfig
from ssl_vit.data.datasets import (
    DataError,
    HFImages,
    ImageDataset,
    ImageFiles,
    Source,
)
from ssl_vit.data.randaugment import DeviceRandAugment, draw_erasing, erase
from ssl_vit.data.synthetic import SyntheticImages
from ssl_vit.data.transforms import BLUR_KERNEL, BLUR_SIGMA, JITTER, Crop, View

RATIO = (3.0 / 4.0, 4.0 / 3.0)
"""RandomResizedCrop's aspect-ratio range, as single_view uses it (torchvision's default)."""
ATTEMPTS = 10
"""Tries of RandomResizedCrop.make_params before its centre-crop fallback."""


@contextmanager
def _quiet() -> Iterator[None]:
    """torchvision 0.29 warns on every decode/encode call that TorchCodec supersedes it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        yield


# ---------------------------------------------------------------------------------------------
# dataset side: encoded bytes


@dataclass(frozen=True)
class Encoded:
    """One image's encoded file bytes, uint8 (N,), and where they come from (for skip logs).

    No `.to` method on purpose: Accelerate's device placement leaves it (and its bytes) on the
    host, where `decode_jpeg` wants its input even when decoding on the GPU.
    """

    data: Tensor
    path: str


@dataclass(frozen=True)
class EncodedBatch:
    """A batch's encoded images packed in one flat uint8 tensor, image k being
    data[offsets[k]:offsets[k + 1]], with their paths.

    One tensor, because a loader worker hands each tensor storage over as its own shared-memory
    file descriptor: a list of B small tensors per batch fails ("Bad file descriptor"). Host-only
    like `Encoded` (no `.to`); `pin_memory` is honoured for faster copies to nvJPEG.
    """

    data: Tensor
    offsets: list[int]
    paths: list[str]

    @classmethod
    def pack(cls, items: Sequence[Encoded]) -> EncodedBatch:
        sizes = [it.data.numel() for it in items]
        offsets = [0, *np.cumsum(sizes).tolist()]
        return cls(torch.cat([it.data for it in items]), offsets, [it.path for it in items])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> Tensor:
        """Image k's bytes, uint8 (N_k,), a view."""
        return self.data[self.offsets[k] : self.offsets[k + 1]]

    def pin_memory(self) -> EncodedBatch:
        return EncodedBatch(self.data.pin_memory(), self.offsets, self.paths)


def _read(path: str) -> Tensor:
    """A file's bytes -> uint8 (N,)."""
    with _quiet():
        return read_file(path)


def _as_bytes_tensor(obj: Any) -> Tensor:
    """Raw bytes, a path, or a Hugging Face {"bytes", "path"} dict -> uint8 (N,)."""
    if isinstance(obj, dict):
        obj = obj["bytes"] if obj.get("bytes") is not None else obj["path"]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(obj), dtype=torch.uint8)
    return _read(str(obj))


def _png(image: Any) -> Tensor:
    """A decoded image (uint8 (3, H, W) tensor or PIL) -> lossless PNG bytes uint8 (N,)."""
    with _quiet():
        return encode_png(F.pil_to_tensor(image) if not isinstance(image, Tensor) else image)


class EncodedSource:
    """A `Source` whose items are (Encoded, label) instead of decoded images: the file bytes of an
    image folder or Hugging Face dataset; other sources (synthetic) are rendered and stored as
    lossless PNG, so every command also runs in this mode."""

    def __init__(self, source: Source):
        self.source, self.classes = source, source.classes

    def __len__(self) -> int:
        return len(self.source)

    def path(self, i: int) -> str:
        return self.source.path(i)

    def __getitem__(self, i: int) -> tuple[Encoded, int]:
        s = self.source
        if isinstance(s, ImageFiles):
            data, label = _read(s.files[i]), s.labels[i]
        elif isinstance(s, HFImages):
            row = s.ds[i]
            value = row[s.label_column] if s.label_column else None
            data, label = _as_bytes_tensor(row[s.image_column]), -1 if value is None else value
        else:
            image, label = s[i]
            data = _png(image)
        if data.numel() == 0:
            raise DataError(f"{self.path(i)}: empty file")
        return Encoded(data, self.path(i)), int(label)


def keep(x: Any) -> Any:
    """The identity, a module-level function so that the view pickles into loader workers."""
    return x


def encoded_dataset(dataset: ImageDataset) -> ImageDataset:
    """The same images, order and seed as `dataset` (built and probed by `build_dataset`), with
    items {"encoded": Encoded, "labels", "index", "skipped"}; `collate` packs "encoded" into an
    EncodedBatch."""
    out = ImageDataset(EncodedSource(dataset.source), View("encoded", keep), dataset.seed)
    out.set_epoch(dataset.epoch)
    return out


# ---------------------------------------------------------------------------------------------
# decode


def is_jpeg(data: Tensor) -> bool:
    """JPEG files start with the SOI marker FF D8 FF."""
    return data.numel() >= 3 and data[:3].tolist() == [0xFF, 0xD8, 0xFF]


def _rgb8(image: Tensor) -> Tensor:
    """Decoders give uint16 for 16-bit PNGs; views want uint8 (as PIL's convert("RGB"))."""
    return image if image.dtype == torch.uint8 else F.to_dtype(image, torch.uint8, scale=True)


def decode(data: Sequence[Tensor], device: torch.device | str) -> list[Tensor | None]:
    """Encoded bytes (host uint8 (N,) each) -> RGB uint8 (3, H_k, W_k) on `device`; None where
    the bytes do not decode.

    On CUDA, JPEGs are decoded in one batched nvJPEG call; one bad file fails the whole call, so
    then (and for other formats, e.g. PNG) images are decoded one by one, on the CPU when nvJPEG
    refuses them. On the CPU every image goes through torchvision's `decode_image`.
    """
    device = torch.device(device)
    out: list[Tensor | None] = [None] * len(data)
    with _quiet():
        if device.type == "cuda":
            jpegs = [k for k, d in enumerate(data) if is_jpeg(d)]
            try:
                if jpegs:
                    batch = [data[k] for k in jpegs]
                    decoded = decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)
                    for k, image in zip(jpegs, decoded, strict=True):
                        out[k] = image
            except (RuntimeError, ValueError):
                pass  # find the bad file(s) one by one below
        for k, d in enumerate(data):
            if out[k] is not None:
                continue
            try:
                if device.type == "cuda" and is_jpeg(d):
                    out[k] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
                    continue
            except (RuntimeError, ValueError):
                pass  # e.g. a CMYK or progressive variant nvJPEG refuses: try the CPU decoder
            try:
                out[k] = _rgb8(decode_image(d, mode=ImageReadMode.RGB)).to(device)
            except (RuntimeError, ValueError):
                out[k] = None
    return out


# ---------------------------------------------------------------------------------------------
# augment


def batch_generator(*key: int) -> torch.Generator:
    """A host generator seeded from `key`, e.g. (seed, epoch, batch index, rank): the same
    augmentation for the same batch after a resume, independent across processes.

    On the host because every crop box is needed there (each crop is resized on its own) and
    masks known there select the images an augmentation touches: no draw waits for the device
    (a device draw read back would wait for the steps queued before it)."""
    hi, lo = (int(s) for s in np.random.SeedSequence(list(key)).generate_state(2))
    return torch.Generator().manual_seed(hi << 32 | lo)


def sample_crops(
    sizes: Tensor,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = RATIO,
) -> Tensor:
    """RandomResizedCrop.make_params for a batch, vectorised on the generator's device.

    sizes: int (B, 2) image (height, width) -> int64 (B, 4) (top, left, height, width).

    The same distribution as torchvision's loop: up to ATTEMPTS draws of area fraction ~
    U(scale) and log aspect ratio ~ U(log ratio), w = round(sqrt(area * r)), h = round(sqrt(area
    / r)); the first draw that fits is kept, at a uniform integer position; none fits -> the
    centre crop clamped to the ratio range. All attempts are drawn at once and the first fitting
    one taken, which leaves the distribution unchanged and needs no host sync.
    """
    dev = generator.device
    sizes = sizes.to(dev)
    b = sizes.shape[0]
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    # float32 draws like torchvision's torch.empty(1).uniform_(lo, hi); the rest in float64 as
    # its Python arithmetic
    u = torch.rand(b, ATTEMPTS, 2, generator=generator, device=dev)
    area_frac = scale[0] + (scale[1] - scale[0]) * u[..., 0]
    log_ratio = torch.log(torch.tensor(ratio, device=dev))
    aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[..., 1])
    target = height * width * area_frac.double()
    w = torch.round(torch.sqrt(target * aspect.double()))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(target / aspect.double()))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first fitting attempt
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    height, width = height.squeeze(1), width.squeeze(1)
    pos = torch.rand(b, 2, generator=generator, device=dev, dtype=torch.float64)
    top = torch.minimum(torch.floor(pos[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(pos[:, 1] * (width - w + 1)), width - w)
    # fallback: the whole image, narrowed to the nearest allowed aspect ratio, centred
    in_ratio = width / height
    fb_w = torch.where(in_ratio > max(ratio), torch.round(height * max(ratio)), width)
    fb_h = torch.where(in_ratio < min(ratio), torch.round(width / min(ratio)), height)
    fb_top, fb_left = torch.floor((height - fb_h) / 2), torch.floor((width - fb_w) / 2)
    ok = fits.any(dim=1)
    params = torch.stack(
        [
            torch.where(ok, top, fb_top),
            torch.where(ok, left, fb_left),
            torch.where(ok, h, fb_h),
            torch.where(ok, w, fb_w),
        ],
        dim=1,
    )
    return params.long()


class CropParams(NamedTuple):
    """The draws of one `Crop` for a batch of B images, host tensors; the distributions of the
    CPU view's transforms (`transforms.crop_transform`)."""

    boxes: Tensor
    """int64 (B, 4): top, left, height, width (`sample_crops`)."""
    flip: Tensor
    """bool (B,): p = data.hflip."""
    jitter: Tensor
    """bool (B,): colour jitter, p = crop.jitter."""
    order: Tensor
    """int64 (B, 4): the jitter's operations in the order applied (JITTER_OPS indices), a
    uniform permutation as v2.ColorJitter's randperm."""
    factors: Tensor
    """float32 (B, 4): brightness, contrast, saturation factors ~ U(1 -+ JITTER[:3]), hue shift
    ~ U(-+JITTER[3])."""
    gray: Tensor
    """bool (B,): p = crop.grayscale."""
    blur: Tensor
    """bool (B,): p = crop.blur."""
    sigma: Tensor
    """float32 (B,): blur sigma ~ U(BLUR_SIGMA)."""
    solarize: Tensor
    """bool (B,): p = crop.solarize."""


def sample_params(
    crop: Crop, sizes: Tensor, hflip: float, generator: torch.Generator
) -> CropParams:
    """Draw `crop`'s randomness for images of `sizes` int (B, 2) (height, width)."""
    b = sizes.shape[0]

    def coin(p: float) -> Tensor:
        return torch.rand(b, generator=generator) < p

    def uniform(lo: Tensor | float, hi: Tensor | float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    b_, c_, s_, h_ = JITTER
    lo, hi = torch.tensor([1 - b_, 1 - c_, 1 - s_, -h_]), torch.tensor([1 + b_, 1 + c_, 1 + s_, h_])
    return CropParams(
        boxes=sample_crops(sizes, crop.scale, generator),
        flip=coin(hflip),
        jitter=coin(crop.jitter),
        order=torch.rand(b, 4, generator=generator).argsort(dim=1),
        factors=uniform(lo, hi, 4),
        gray=coin(crop.grayscale),
        blur=coin(crop.blur),
        sigma=uniform(*BLUR_SIGMA),
        solarize=coin(crop.solarize),
    )


def resized_crops(
    images: Sequence[Tensor], boxes: Tensor, size: int, interpolation: str | InterpolationMode
) -> Tensor:
    """images uint8 (3, H_k, W_k) on one device, boxes int64 (B, 4) on the host
    -> uint8 (B, 3, size, size): each box resized (antialiased) as RandomResizedCrop resizes a
    uint8 tensor image on that device. torchvision resizes uint8 natively on the CPU; elsewhere it
    goes through float32, then clamps and rounds (`resized_crops_float`)."""
    if images[0].device.type != "cpu":
        return resized_crops_float(images, boxes, size, interpolation)
    mode = InterpolationMode(interpolation)
    return torch.stack(
        [
            F.resized_crop(image, top, left, h, w, [size, size], mode, antialias=True)
            for image, (top, left, h, w) in zip(images, boxes.tolist(), strict=True)
        ]
    )


def resized_crops_float(
    images: Sequence[Tensor], boxes: Tensor, size: int, interpolation: str | InterpolationMode
) -> Tensor:
    """torchvision's float route of `resized_crops` (its CUDA one), with the float copy made once
    per image rather than per crop and the clamp and rounding batched: the same values with one
    kernel per crop (DINO takes 12 per image)."""
    mode = InterpolationMode(interpolation)
    smooth = mode in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)  # else nearest
    kwargs = dict(mode=mode.value, align_corners=False if smooth else None, antialias=smooth)
    floats: dict[int, Tensor] = {}  # one copy per distinct image (a batch may repeat one)
    crops = []
    for image, (top, left, h, w) in zip(images, boxes.tolist(), strict=True):
        src = floats.setdefault(id(image), image.float())
        crop = src[None, :, top : top + h, left : left + w]
        crops.append(interpolate(crop, [size, size], **kwargs) if (h, w) != (size, size) else crop)
    out = torch.cat(crops)
    if mode == InterpolationMode.BICUBIC:  # overshoots
        out.clamp_(0, 255)
    return out.round_().to(torch.uint8)


def apply_to(x: Tensor, mask: Tensor, fn: Any, *args: Tensor) -> Tensor:
    """x[k] = fn(x[k], *(a[k] for a in args)) for the images k where the host bool (B,) mask
    holds, in place. The mask is on the host, so selecting needs no device sync, and the
    augmentation runs only on the images it applies to."""
    rows = mask.nonzero().squeeze(1)
    if len(rows):
        idx = rows.to(x.device)
        x[idx] = fn(x[idx], *(a[rows].to(x.device) for a in args))
    return x


def _grayscale(x: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 1, H, W) luma, floored: the degenerate image of
    torchvision's uint8 contrast and saturation kernels."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _blend(x: Tensor, y: Tensor, ratio: Tensor) -> Tensor:
    """uint8 x * ratio + y * (1 - ratio) per image (ratio (B,)), clamped and truncated to uint8,
    as torchvision's `_blend` (1 - ratio in float64, as its Python arithmetic)."""
    r = ratio.view(-1, 1, 1, 1)
    out = x * r + y * (1 - r.double()).float()
    return out.clamp_(0, 255).to(torch.uint8)


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    """F.adjust_brightness per image: uint8 (B, 3, H, W), factor (B,) -> uint8."""
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 255).to(torch.uint8)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """F.adjust_contrast per image: blend with the image's mean (floored) luma."""
    return _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def saturation(x: Tensor, factor: Tensor) -> Tensor:
    """F.adjust_saturation per image: blend with the (floored) luma image."""
    return _blend(x, _grayscale(x), factor)


HSV_TO_RGB = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))
"""For each RGB channel and hue sextant, which of (v, p, q, t) it takes."""


def hue(x: Tensor, shift: Tensor) -> Tensor:
    """F.adjust_hue per image: uint8 (B, 3, H, W), shift (B,) in turns -> uint8; through HSV in
    float32 with torchvision's formulas (Pillow's), so equal to it."""
    image = F.to_dtype(x, torch.float32, scale=True)
    r, g, _ = image.unbind(1)
    maxc, minc = image.amax(1), image.amin(1)
    flat = maxc == minc  # gray pixels: hue and saturation 0, and no division by zero
    ones = torch.ones_like(maxc)
    span = maxc - minc
    s = span / torch.where(flat, ones, maxc)
    rel = (maxc.unsqueeze(1) - image) / torch.where(flat, ones, span).unsqueeze(1)
    rc, gc, bc = rel.unbind(1)
    not_r, is_g = maxc != r, maxc == g
    h = (bc - gc) * ~not_r + (rc + 2.0 - bc) * (is_g & not_r) + (gc + 4.0 - rc) * (not_r & ~is_g)
    h = (h * (1.0 / 6.0) + 1.0).fmod_(1.0)
    h = (h + shift.view(-1, 1, 1)).remainder_(1.0)
    # back to RGB
    h6 = h * 6
    sector = torch.floor(h6)
    f = h6 - sector
    sxf, one_minus_s = s * f, 1.0 - s
    q = ((1.0 - sxf) * maxc).clamp_(0.0, 1.0)
    t = ((sxf + one_minus_s) * maxc).clamp_(0.0, 1.0)
    p = (one_minus_s * maxc).clamp_(0.0, 1.0)
    vpqt = torch.stack((maxc, p, q, t), dim=1)
    table = torch.tensor(HSV_TO_RGB, device=x.device)
    select = table[:, sector.int().remainder_(6)].movedim(0, 1)  # (B, 3, H, W)
    return F.to_dtype(vpqt.gather(1, select), torch.uint8, scale=True)


JITTER_OPS = (brightness, contrast, saturation, hue)
"""v2.ColorJitter's operations, in its numbering (CropParams.order)."""


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """F.gaussian_blur with a BLUR_KERNEL kernel per image, as transforms.GaussianBlur does to a
    tensor image, but separable (equal up to float rounding).

    uint8 (B, 3, H, W), sigma (B,) -> uint8."""
    b, c, h, w = x.shape
    k = BLUR_KERNEL
    lim = (k - 1) / (2.0 * math.sqrt(2.0))
    grid = torch.linspace(-lim, lim, k, device=x.device)
    kernel = (grid / sigma[:, None]).pow(2).neg().softmax(dim=1).repeat_interleave(c, dim=0)
    y = pad(x.float().view(1, b * c, h, w), [k // 2] * 4, mode="reflect")
    y = conv2d(y, kernel.view(b * c, 1, 1, k), groups=b * c)
    y = conv2d(y, kernel.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w).round_().to(torch.uint8)


def augment_crop(
    images: Sequence[Tensor], crop: Crop, p: CropParams, interpolation: str | InterpolationMode
) -> Tensor:
    """One crop of every image with its drawn params: uint8 (3, H_k, W_k) -> uint8 (B, 3, s, s),
    s = crop.size; `crop_transform`'s steps in its order."""
    x = resized_crops(images, p.boxes, crop.size, interpolation)
    apply_to(x, p.flip, F.horizontal_flip)
    if crop.jitter:
        for step in range(4):  # each image's own order of the four operations
            for index, op in enumerate(JITTER_OPS):
                apply_to(x, p.jitter & (p.order[:, step] == index), op, p.factors[:, index])
    if crop.grayscale:
        apply_to(x, p.gray, partial(F.rgb_to_grayscale, num_output_channels=3))
    if crop.blur:
        apply_to(x, p.blur, gaussian_blur, p.sigma)
    if crop.solarize:
        apply_to(x, p.solarize, partial(F.solarize, threshold=128))
    return x


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (B, 3, H, W) -> float32, (x / 255 - mean) / std per channel."""
    return F.normalize(
        F.to_dtype(x, torch.float32, scale=True), list(mean), list(std), inplace=True
    )


@dataclass(frozen=True)
class DeviceView:
    """A view of transforms.py run on a batch on the device: each of `crops` drawn per image.
    key "images" with one crop = `single_view` (a tensor), with `randaugment` and `reprob` =
    `supervised_view`; key "crops" = `multi_crop` (a list)."""

    key: str
    crops: tuple[Crop, ...]
    interpolation: str = "bicubic"
    hflip: float = 0.5
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    randaugment: DeviceRandAugment | None = None
    """timm's RandAugment after the crop (DeiT's `supervised_view`)."""
    reprob: float = 0.0
    """timm's random erasing after the normalisation, with this probability."""

    def __post_init__(self) -> None:
        if self.key not in ("images", "crops") or (self.key == "images") != (len(self.crops) == 1):
            raise ValueError(
                f"DeviceView: key 'images' takes one crop, 'crops' several; got "
                f"{self.key!r} with {len(self.crops)}"
            )

    def params(self, images: Sequence[Tensor], generator: torch.Generator) -> list[CropParams]:
        """Each crop's draws for `images`, on the host generator."""
        sizes = torch.tensor([list(im.shape[-2:]) for im in images])
        return [sample_params(c, sizes, self.hflip, generator) for c in self.crops]

    def __call__(
        self, images: Sequence[Tensor], generator: torch.Generator
    ) -> Tensor | list[Tensor]:
        """images uint8 (3, H_k, W_k) -> float32 (B, 3, s, s) per crop, normalised."""
        out = []
        for crop, p in zip(self.crops, self.params(images, generator), strict=True):
            x = augment_crop(images, crop, p, self.interpolation)
            seeds = torch.randint(2**62, (3,), generator=generator).tolist()
            if self.randaugment is not None:
                x = self.randaugment(x, seeds[0])
            x = normalize(x, self.mean, self.std)
            if self.reprob:
                boxes = draw_erasing(len(x), crop.size, crop.size, self.reprob, seeds[1])
                noise = torch.Generator(x.device).manual_seed(seeds[2])
                x = erase(x, boxes, noise)
            out.append(x)
        return out if self.key == "crops" else out[0]

    def apply(
        self, batch: dict[str, Any], generator: torch.Generator, device: torch.device | str
    ) -> dict[str, Any]:
        """A collated batch of the encoded dataset -> the batch the CPU view would have given:
        "encoded" decoded on `device` and augmented into `key`; the paths of bytes that do not
        decode are added to "skipped" and their slots (image and label) filled by the next
        decodable image of the batch, as ImageDataset does for unreadable files."""
        batch = dict(batch)
        encoded: EncodedBatch = batch.pop("encoded")
        images = decode([encoded[k] for k in range(len(encoded))], device)
        good = [k for k, im in enumerate(images) if im is not None]
        if not good:
            raise DataError(f"no image of a batch could be decoded: {encoded.paths}")
        if len(good) < len(images):
            bad = [k for k, im in enumerate(images) if im is None]
            src = [next((g for g in good if g > k), good[0]) for k in bad]
            for k, g in zip(bad, src, strict=True):
                images[k] = images[g]
            labels = batch["labels"].clone()
            labels[torch.tensor(bad)] = labels[torch.tensor(src)]
            batch["labels"] = labels
            batch["skipped"] = [*batch.get("skipped", []), *(encoded.paths[k] for k in bad)]
        batch[self.key] = self(images, generator)  # type: ignore[arg-type]
        return batch


def device_view(data_cfg: DataConfig, key: str, crops: Sequence[Crop]) -> DeviceView:
    """The device counterpart of a view of `crops` with data_cfg's interpolation, flip and
    normalisation."""
    return DeviceView(
        key,
        tuple(crops),
        data_cfg.interpolation,
        data_cfg.hflip,
        tuple(data_cfg.mean),
        tuple(data_cfg.std),
    )


def device_supervised_view(
    data_cfg: DataConfig, img_size: int, auto_augment: str, color_jitter: float, re_prob: float
) -> DeviceView:
    """The device counterpart of `supervised_view` (DeiT, fine-tuning): crop and flip, timm's
    RandAugment `auto_augment` (a "rand-..." policy), normalisation, random erasing."""
    if not auto_augment.startswith("rand") and (auto_augment or color_jitter):
        raise ConfigError(
            [
                f"data.decode_on_device: method.auto_augment {auto_augment!r} with "
                f"method.color_jitter {color_jitter}: the device view runs RandAugment policies "
                f"('rand-...') only, or no augmentation ('' with color_jitter 0)"
            ]
        )
    randaugment = None
    if auto_augment:
        randaugment = DeviceRandAugment(
            auto_augment, img_size, data_cfg.interpolation, tuple(data_cfg.mean)
        )
    view = device_single_view(data_cfg, img_size)
    return dataclasses.replace(view, randaugment=randaugment, reprob=re_prob)


def device_single_view(data_cfg: DataConfig, img_size: int) -> DeviceView:
    """The device counterpart of `single_view(data_cfg, img_size)`."""
    return device_view(data_cfg, "images", [Crop(img_size, tuple(data_cfg.crop_scale))])


# ---------------------------------------------------------------------------------------------
# benchmark data


def write_image_folder(
    root: str | Path, n: int, size: int, fmt: str = "jpeg", quality: int = 90
) -> Path:
    """Write `n` synthetic size x size images (JPEG at `quality`, or PNG) into `root`, for
    benchmarks and tests; returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images = SyntheticImages(n, image_size=size)
    with _quiet():
        for i in range(n):
            image = images[i][0]
            data = encode_jpeg(image, quality=quality) if fmt == "jpeg" else encode_png(image)
            (root / f"{i:06d}.{'jpg' if fmt == 'jpeg' else 'png'}").write_bytes(
                data.numpy().tobytes()
            )
    return root
