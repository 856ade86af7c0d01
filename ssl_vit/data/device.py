"""Decode and augment on the accelerator (`data.decode_on_device`): a data path that keeps up.

Why: MAE ViT-B/16 at 40 % MFU on an H100 eats several thousand img/s, while PIL decode +
RandomResizedCrop manage a few hundred per loader worker. Here loader workers only read the
encoded file bytes; the training process decodes a whole batch with nvJPEG
(`torchvision.io.decode_jpeg(list, device=...)`) and augments it on the device.

Same semantics as the CPU view `transforms.single_view` (MAE; also the MAE linear probe):
RandomResizedCrop(data.crop_scale, ratio 3/4-4/3, data.interpolation, antialias) with the
crop distribution of torchvision's `RandomResizedCrop.make_params` (vectorised), horizontal flip
with p = data.hflip, ToDtype float, Normalize. What differs, by design or by decoder:

* the crop is resized as a uint8 tensor by torch's antialiased kernels (the same ones
  single_view runs on tensor inputs, so equal to it there); on the CPU path PIL resizes PIL
  images: within one uint8 level (tests/test_device_data.py);
* nvJPEG (GPU) and libjpeg-turbo (CPU) may differ by a few levels per pixel; on the CPU this path
  decodes with torchvision's libjpeg-turbo / libpng, like PIL;
* randomness is drawn from a generator on the device keyed by (seed, epoch, batch, rank)
  (`batch_generator`), not per sample: a resumed run sees the same crops, but the crops are not
  those of the CPU path for the same seed;
* a file that cannot be read is skipped by `ImageDataset` as before; one whose bytes do not decode
  here is replaced by another image of its batch (with its label) and reported in "skipped".
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
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

from ssl_vit.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from ssl_vit.data.datasets import (
    DataError,
    HFImages,
    ImageDataset,
    ImageFiles,
    Source,
    build_dataset,
    build_loader,
)
from ssl_vit.data.synthetic import SyntheticImages
from ssl_vit.data.transforms import View, single_view

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


def batch_generator(device: torch.device | str, *key: int) -> torch.Generator:
    """A generator on `device` seeded from `key`, e.g. (seed, epoch, batch index, rank): the same
    augmentation for the same batch after a resume, independent across processes."""
    hi, lo = (int(s) for s in np.random.SeedSequence(list(key)).generate_state(2))
    return torch.Generator(torch.device(device)).manual_seed(hi << 32 | lo)


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


def augment(
    images: Sequence[Tensor],
    params: Sequence[Sequence[int]],
    size: int,
    interpolation: str | InterpolationMode,
    mean: Sequence[float],
    std: Sequence[float],
) -> Tensor:
    """The single view with explicit parameters: images uint8 (3, H_k, W_k) on one device,
    params (top, left, height, width, flip) per image -> float32 (B, 3, size, size), normalised.

    Each crop is resized as uint8 with `resized_crop` (antialiased), as single_view does to a
    tensor image; flip, float conversion and normalisation are then one batched op each.
    """
    mode = InterpolationMode(interpolation)
    crops = []
    for image, (top, left, h, w, flip) in zip(images, params, strict=True):
        crop = F.resized_crop(image, top, left, h, w, [size, size], mode, antialias=True)
        crops.append(F.horizontal_flip(crop) if flip else crop)
    batch = F.to_dtype(torch.stack(crops), torch.float32, scale=True)
    return F.normalize(batch, list(mean), list(std), inplace=True)


@dataclass(frozen=True)
class DeviceView:
    """MAE's single view (`transforms.single_view`) applied to a batch on the device."""

    size: int
    scale: tuple[float, float]
    interpolation: str = "bicubic"
    hflip: float = 0.5
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def params(self, images: Sequence[Tensor], generator: torch.Generator) -> list[list[int]]:
        """Per image (top, left, height, width, flip), drawn on the generator's device; one host
        sync (the crop boxes are Python ints for `resized_crop`)."""
        sizes = torch.tensor([list(im.shape[-2:]) for im in images])
        crops = sample_crops(sizes, self.scale, generator)
        flips = torch.rand(len(images), generator=generator, device=generator.device) < self.hflip
        return torch.cat([crops, flips.long()[:, None]], dim=1).tolist()

    def __call__(self, images: Sequence[Tensor], generator: torch.Generator) -> Tensor:
        """images uint8 (3, H_k, W_k) -> float32 (B, 3, size, size), normalised."""
        params = self.params(images, generator)
        return augment(images, params, self.size, self.interpolation, self.mean, self.std)

    def apply(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """A collated batch of the encoded dataset -> the batch single_view would have given:
        "encoded" decoded on the generator's device and augmented into "images"; the paths of
        bytes that do not decode are added to "skipped" and their slots (image and label) filled
        by the next decodable image of the batch, as ImageDataset does for unreadable files."""
        batch = dict(batch)
        encoded: EncodedBatch = batch.pop("encoded")
        images = decode([encoded[k] for k in range(len(encoded))], generator.device)
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
        batch["images"] = self(images, generator)  # type: ignore[arg-type]
        return batch


def device_single_view(data_cfg: DataConfig, img_size: int) -> DeviceView:
    """The device counterpart of `single_view(data_cfg, img_size)`."""
    return DeviceView(
        img_size,
        tuple(data_cfg.crop_scale),
        data_cfg.interpolation,
        data_cfg.hflip,
        tuple(data_cfg.mean),
        tuple(data_cfg.std),
    )


# ---------------------------------------------------------------------------------------------
# throughput


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(
    path: str | Path,
    *,
    img_size: int = 224,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    passes: int = 2,
    data_cfg: DataConfig | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """img/s of the two data paths over `passes` passes of the image folder `path`, timed after
    one warm-up batch (worker start, CUDA/nvJPEG initialisation):

    * cpu: PIL decode + single_view in `num_workers` DataLoader workers, batches stacked;
    * device: the bytes read in `num_workers` workers, batched decode + DeviceView on `device`
      in this process (synchronised before the clock stops).

    -> {"cpu_img_per_s", "device_img_per_s", "images", "batch_size", "num_workers", "device"}.
    """
    device = torch.device(device)
    data_cfg = dataclasses.replace(data_cfg or DataConfig(), path=str(path))
    dataset = build_dataset(data_cfg, single_view(data_cfg, img_size), seed=seed)
    view = device_single_view(data_cfg, img_size)

    def loader(ds: ImageDataset) -> torch.utils.data.DataLoader:
        sampler = torch.utils.data.RandomSampler(
            ds, num_samples=passes * len(ds), generator=torch.Generator().manual_seed(seed)
        )
        return build_loader(
            ds,
            batch_size,
            shuffle=False,
            drop_last=True,
            num_workers=num_workers,
            pin_memory=True,  # as the trainer (build_loader pins only when CUDA is there)
            seed=seed,
            sampler=sampler,
        )

    def timed(batches: Any, step: Any) -> float:
        images, start = 0, 0.0
        for i, batch in enumerate(batches):
            step(i, batch)
            if i == 0:
                start = time.perf_counter()
            else:
                images += len(batch["index"])
        if not images:
            raise ValueError(f"throughput: {path} holds too few images for 2 batches")
        return images / (time.perf_counter() - start)

    def cpu_step(i: int, batch: dict[str, Any]) -> None:
        batch["images"].to(device)
        _synchronize(device)

    def device_step(i: int, batch: dict[str, Any]) -> None:
        view.apply(batch, batch_generator(device, seed, 0, i))
        _synchronize(device)

    cpu = timed(loader(dataset), cpu_step)
    dev = timed(loader(encoded_dataset(dataset)), device_step)
    return {
        "cpu_img_per_s": cpu,
        "device_img_per_s": dev,
        "images": passes * len(dataset),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": str(device),
    }
