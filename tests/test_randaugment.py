"""DeiT's training view on the device (data/randaugment.py): each batched RandAugment operation
against timm's own PIL operation, the draws against timm's RandAugment and RandomErasing, and
the whole view's output statistics against the CPU view."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from timm.data import auto_augment as aa
from timm.data.random_erasing import RandomErasing
from torchvision.transforms.v2 import functional as F

from ssl_vit.config import ConfigError, DataConfig
from ssl_vit.data import SyntheticImages, batch_generator, seeded
from ssl_vit.data.device import device_supervised_view
from ssl_vit.data.device import randaugment as ra
from ssl_vit.data.transforms import posterize, supervised_view

N = 8
FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean
POLICY = "rand-m9-mstd0.5-inc1"


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """uint8 (N, 3, 40, 40): synthetic images (flat colours, edges) plus noise (gradients)."""
    images = torch.stack([SyntheticImages(N, image_size=40)[i][0] for i in range(N)])
    noise = torch.randint(-40, 40, images.shape, generator=torch.Generator().manual_seed(0))
    return (images.int() + noise).clamp(0, 255).to(torch.uint8)


def _timm(x: torch.Tensor, op, args) -> torch.Tensor:
    """timm's PIL operation on each image of x with its own arguments."""
    out = [F.pil_to_tensor(op(F.to_pil_image(x[k]), *args(k))) for k in range(len(x))]
    return torch.stack(out)


LEVELS = torch.linspace(0.1, 1.9, N)  # enhance factors, both sides of 1
POINT_OPS = [  # (ours, timm's, per-image arguments or None)
    ("invert", aa.invert, None),
    ("auto_contrast", aa.auto_contrast, None),
    ("equalize", aa.equalize, None),
    ("posterize", posterize, torch.tensor([0, 1, 2, 3, 4, 0, 2, 4])),
    ("solarize", aa.solarize, torch.tensor([0, 30, 60, 128, 200, 256, 100, 255])),
    ("solarize_add", aa.solarize_add, torch.tensor([0, 10, 30, 50, 70, 90, 110, 5])),
    ("color", aa.color, LEVELS),
    ("contrast", aa.contrast, LEVELS),
    ("brightness", aa.brightness, LEVELS),
    ("sharpness", aa.sharpness, LEVELS),
]


@pytest.mark.parametrize("name, reference, values", POINT_OPS, ids=[o[0] for o in POINT_OPS])
def test_point_operations_equal_timms_pil_ones(batch, name, reference, values):
    ours = getattr(ra, name)(batch.clone(), *([] if values is None else [values]))
    args = (lambda k: ()) if values is None else (lambda k: (values[k].item(),))
    expected = _timm(batch, reference, args)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, batch) or name == "posterize"  # and it changes the images


AFFINE_OPS = [
    ("Rotate", aa.rotate, torch.linspace(-30, 30, N)),
    ("ShearX", aa.shear_x, torch.linspace(-0.3, 0.3, N)),
    ("ShearY", aa.shear_y, torch.linspace(-0.3, 0.3, N)),
    ("TranslateXRel", aa.translate_x_rel, torch.linspace(-0.45, 0.45, N)),
    ("TranslateYRel", aa.translate_y_rel, torch.linspace(-0.45, 0.45, N)),
]


@pytest.mark.parametrize("name, reference, values", AFFINE_OPS, ids=[o[0] for o in AFFINE_OPS])
def test_affine_operations_resample_as_pillow(batch, name, reference, values):
    """Pixel centres, edge clamping and the fill outside as Image.transform: bilinear within
    one level (on under 10 % of the values: float32 vs Pillow's double), nearest equal but for
    ties; bicubic within a few levels on average (torch's kernel, not Pillow's)."""
    for resample, mean_bound, ones_bound in ((Image.Resampling.BILINEAR, 0.1, 0.1),
                                             (Image.Resampling.NEAREST, 0.01, 0.001),
                                             (Image.Resampling.BICUBIC, 2.0, 1.0)):  # fmt: skip
        filters = torch.full((N,), int(resample))
        ours = ra.OPS[name](batch.clone(), values, filters, FILL)
        expected = _timm(
            batch,
            lambda im, v, r=resample: reference(im, v, fillcolor=FILL, resample=r),
            lambda k: (values[k].item(),),
        )
        diff = (ours.int() - expected.int()).abs().float()
        assert diff.mean() < mean_bound and (diff > 1).float().mean() < ones_bound, resample
        if resample == Image.Resampling.BILINEAR:
            assert diff.max() <= 1
    filled = (ours == torch.tensor(FILL)[:, None, None]).all(dim=1)  # moved in: the fill colour
    assert filled[values.abs() > 0.05].any() and not filled[values.abs() < 1e-6].any()


def test_randaugment_draws_are_timms():
    """draw_randaugment gives, image by image, the operations, level arguments and filters that
    timm's RandAugment applies under the same seed (its aug_fns recorded, not run)."""
    view = ra.DeviceRandAugment(POLICY, 224, "random", (0.485, 0.456, 0.406))
    timm_ra = view.transform()
    seen: list[list[tuple]] = []
    for op in timm_ra.ops:

        def record(img, *args, _name=op.name, **kw):
            if _name in ra.AFFINE:
                aa._check_args_tf(kw)  # timm's own filter draw, as its affine ops make it
                seen[-1].append((_name, args, int(kw["resample"])))
            else:
                seen[-1].append((_name, args, None))
            return img

        op.aug_fn = record
    image = Image.new("RGB", (8, 8))
    with seeded(5):
        for _ in range(200):
            seen.append([])
            timm_ra(image)
    layers = ra.draw_randaugment(view.transform(), 200, 5)
    ours = [
        [(a.name, a.args, a.resample if a.name in ra.AFFINE else None) for a in applied if a]
        for applied in zip(*layers, strict=True)
    ]
    assert ours == seen
    names = {a.name for layer in layers for a in layer if a}
    assert len(names) == 15 and sum(a is None for a in layers[0]) in range(70, 131)  # p 0.5
    filters = {a.resample for layer in layers for a in layer if a and a.name in ra.AFFINE}
    assert filters == {int(Image.Resampling.BILINEAR), int(Image.Resampling.BICUBIC)}


def test_erasing_boxes_are_timms():
    """draw_erasing's boxes are where timm's RandomErasing(0.25, mode='pixel') writes noise into
    a zero image under the same seed."""
    erasing = RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")
    found = []
    with seeded(3):
        for _ in range(200):
            img = torch.zeros(3, 32, 40)
            erasing(img)
            rows, cols = img.abs().sum(0).nonzero(as_tuple=True)
            box = [0, 0, 0, 0]
            if len(rows):
                box = [
                    rows.min(),
                    cols.min(),
                    rows.max() - rows.min() + 1,
                    cols.max() - cols.min() + 1,
                ]
            found.append([int(v) for v in box])
    ours = ra.draw_erasing(200, 32, 40, 0.25, seed=3)
    assert ours.tolist() == found and 25 < (ours[:, 2] > 0).sum() < 75
    x = torch.zeros(200, 3, 32, 40)
    ra.erase(x, ours, torch.Generator().manual_seed(0))
    assert torch.equal(x.abs().sum(1) > 0, _box_masks(ours, 32, 40))  # exactly the boxes
    assert abs(float(x[x != 0].std()) - 1) < 0.05  # standard-normal pixels


def _box_masks(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for k, (top, left, eh, ew) in enumerate(boxes.tolist()):
        masks[k, top : top + eh, left : left + ew] = True
    return masks


def test_supervised_device_view_statistics_match_the_pil_cpu_view():
    """One image, 400 times through DeiT's view on each path (timm's create_transform on PIL;
    the device view on its tensor): per channel, the mean over draws of the image's mean,
    standard deviation and mean horizontal gradient agree within 4 standard errors."""
    n, size, data_cfg = 400, 32, DataConfig()
    pil = F.to_pil_image(SyntheticImages(4, image_size=48)[1][0])
    cpu = supervised_view(data_cfg, size)
    with seeded(0):
        a = torch.stack([cpu(pil)["images"] for _ in range(n)])
    view = device_supervised_view(data_cfg, size, POLICY, 0.0, 0.25)
    b = view([F.pil_to_tensor(pil)] * n, batch_generator(0))
    assert b.shape == a.shape == (n, 3, size, size)
    for stat in (
        lambda x: x.mean(dim=(2, 3)),
        lambda x: x.std(dim=(2, 3)),
        lambda x: (x[..., 1:] - x[..., :-1]).abs().mean(dim=(2, 3)),
    ):
        sa, sb = stat(a), stat(b)
        se = ((sa.var(0) + sb.var(0)) / n).sqrt()
        assert ((sa.mean(0) - sb.mean(0)).abs() < 4 * se).all(), (sa.mean(0), sb.mean(0))


def test_unsupported_policies_are_refused_by_name():
    with pytest.raises(ConfigError, match="method.auto_augment 'original-mstd0.5'"):
        device_supervised_view(DataConfig(), 32, "original-mstd0.5", 0.0, 0.25)
    with pytest.raises(ConfigError, match="method.color_jitter 0.4"):
        device_supervised_view(DataConfig(), 32, "", 0.4, 0.25)
    plain = device_supervised_view(DataConfig(), 32, "", 0.0, 0.0)  # crop and flip only
    assert plain.randaugment is None and math.isclose(plain.reprob, 0.0)


def test_supervised_device_view_erases_after_normalising():
    """reprob 1, no RandAugment, a flat gray image: every output is the normalised gray but for
    one box of standard-normal noise (erasing runs on the normalised tensor, as timm's)."""
    data_cfg = DataConfig()
    view = device_supervised_view(data_cfg, 32, "", 0.0, 1.0)
    out = view([torch.full((3, 40, 40), 128, dtype=torch.uint8)] * 16, batch_generator(1))
    gray = (128 / 255 - torch.tensor(data_cfg.mean)) / torch.tensor(data_cfg.std)
    changed = (out - gray[:, None, None]).abs().amax(1) > 1e-5
    assert changed.flatten(1).any(1).all()  # every image erased somewhere
    for mask in changed:  # in one rectangle
        rows, cols = mask.nonzero(as_tuple=True)
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert mask.sum() >= 0.99 * area and 0.02 * 32 * 32 * 0.9 <= area <= 32 * 32 / 3 * 1.1
