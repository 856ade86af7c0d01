"""Decode and augment on the accelerator (`data.decode_on_device`): a data path that keeps up.

Why: MAE ViT-B/16 at 40 % MFU on an H100 eats several thousand img/s, while PIL decode +
RandomResizedCrop manage a few hundred per loader worker. Here loader workers only read the
encoded file bytes; the training process decodes a whole batch with nvJPEG
(`torchvision.io.decode_jpeg(list, device=...)`) and augments it on the device.

Same semantics as the CPU views of transforms.py: MAE's `single_view` (also the linear probe's)
and DINO's `multi_crop`, both built from `Crop`s; DeiT's `supervised_view` is a `Crop` followed by
timm's RandAugment and random erasing (`randaugment`). Per crop and image: RandomResizedCrop
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

Modules, each importing only those listed before it (and `datasets`, `transforms`, `config`):
`colour` (jitter, grayscale, blur ops), `encoded` (file bytes per item), `decoding` (nvJPEG, CPU),
`crops` (crop draws, resizing, one augmented crop), `randaugment` (DeiT's RandAugment, erasing),
`views` (`DeviceView`: decode + crops + normalisation for a collated batch). The containers
`Encoded` and `EncodedBatch` live in `data.encoded_batch`, below `datasets`, whose `collate`
packs them.
"""

from ssl_vit.data.device.colour import (
    HSV_TO_RGB,
    JITTER_OPS,
    apply_to,
    brightness,
    contrast,
    gaussian_blur,
    hue,
    saturation,
)
from ssl_vit.data.device.crops import (
    ATTEMPTS,
    RATIO,
    CropParams,
    augment_crop,
    batch_generator,
    resized_crops,
    resized_crops_float,
    sample_crops,
    sample_params,
)
from ssl_vit.data.device.decoding import decode
from ssl_vit.data.device.encoded import EncodedSource, encoded_dataset, is_jpeg, keep
from ssl_vit.data.device.randaugment import (
    DeviceRandAugment,
    draw_erasing,
    draw_randaugment,
    erase,
)
from ssl_vit.data.device.views import (
    DeviceView,
    device_single_view,
    device_supervised_view,
    device_view,
    normalize,
)
from ssl_vit.data.encoded_batch import Encoded, EncodedBatch

__all__ = [
    "ATTEMPTS",
    "HSV_TO_RGB",
    "JITTER_OPS",
    "RATIO",
    "CropParams",
    "DeviceRandAugment",
    "DeviceView",
    "Encoded",
    "EncodedBatch",
    "EncodedSource",
    "apply_to",
    "augment_crop",
    "batch_generator",
    "brightness",
    "contrast",
    "decode",
    "device_single_view",
    "device_supervised_view",
    "device_view",
    "draw_erasing",
    "draw_randaugment",
    "encoded_dataset",
    "erase",
    "gaussian_blur",
    "hue",
    "is_jpeg",
    "keep",
    "normalize",
    "resized_crops",
    "resized_crops_float",
    "sample_crops",
    "sample_params",
    "saturation",
]
