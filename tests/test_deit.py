"""DeiT: losses against hand computations, the frozen teacher, Mixup seen by the teacher, EMA,
export into timm's DeiT models, teacher loading, and the repeated-augmentation sampler as it
reaches each process through Accelerate's batch sharding."""

import collections
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from accelerate.data_loader import BatchSamplerShard
from timm.data import Mixup
from torch import nn
from torch.utils.data import BatchSampler
from torchvision.transforms import v2

from ssl_vit.backbone import Backbone
from ssl_vit.checkpoint import export_timm
from ssl_vit.config import Config, ConfigError, DataConfig, validate
from ssl_vit.data import seeded
from ssl_vit.data.samplers import RepeatedAugSampler
from ssl_vit.data.transforms import supervised_view
from ssl_vit.methods.deit import DeiT, DeiTConfig, load_teacher
from ssl_vit.optim import param_groups

K = 5  # classes
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


class SpyTeacher(nn.Module):
    """A linear classifier on pixels, with BatchNorm (so eval mode matters); records its inputs."""

    def __init__(self, size: int = 32):
        super().__init__()
        self.fc = nn.Linear(3 * size * size, K)
        self.bn = nn.BatchNorm1d(K)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return 3 * self.bn(self.fc(x.flatten(1)))


def make(seed=0, **kw) -> DeiT:
    torch.manual_seed(seed)
    cfg = dict(num_classes=K, mixup=0.0, cutmix=0.0, model_ema=False) | kw
    teacher = (
        SpyTeacher(cfg.get("teacher_img_size") or 32)
        if cfg.get("distillation", "none") != "none"
        else None
    )
    return DeiT(Backbone("vit_tiny_patch16_224", **TINY), DeiTConfig(**cfg), teacher)


def batch(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2][:b])


def log_softmax(x):
    """Written out, as an independent formulation."""
    return x - x.exp().sum(-1, keepdim=True).log()


def smoothed(labels, eps=0.1):
    q = torch.full((len(labels), K), eps / K)
    q[torch.arange(len(labels)), labels] += 1 - eps
    return q


def test_soft_distillation_loss_by_hand():
    model = make(distillation="soft", tau=2.0, alpha=0.3)
    images, labels = batch()
    out = model.training_step({"images": images.clone(), "labels": labels})
    cls, dist = model.student(images)
    t = model.teacher(images)
    base = -(smoothed(labels) * log_softmax(cls)).sum(-1).mean()
    log_pt, log_ps = log_softmax(t / 2.0), log_softmax(dist / 2.0)
    # official DeiT: KL summed over batch and classes, x tau^2, / numel (= B * K, not B)
    kd = (log_pt.exp() * (log_pt - log_ps)).sum() * 4.0 / (4 * K)
    torch.testing.assert_close(out["cls_loss"], base)
    torch.testing.assert_close(out["distill_loss"], kd)
    torch.testing.assert_close(out["loss"], 0.7 * base + 0.3 * kd)
    assert kd > 1e-3 and abs(out["loss"] - base) > 1e-3  # the terms are not vacuous


def test_hard_distillation_loss_by_hand():
    model = make(distillation="hard", alpha=0.5)
    images, labels = batch()
    out = model.training_step({"images": images.clone(), "labels": labels})
    cls, dist = model.student(images)
    teacher_label = model.teacher(images).argmax(-1)
    assert not torch.equal(teacher_label, labels)  # so CE to the teacher differs from CE to y
    kd = -log_softmax(dist)[torch.arange(4), teacher_label].mean()
    base = -(smoothed(labels) * log_softmax(cls)).sum(-1).mean()
    torch.testing.assert_close(out["loss"], 0.5 * base + 0.5 * kd)


def test_supervised_has_one_head_and_no_teacher():
    model = make(label_smoothing=0.0)
    assert model.teacher is None and model.student.dist_token is None
    images, labels = batch()
    shapes = []
    model.backbone.blocks[0].register_forward_pre_hook(lambda m, a: shapes.append(a[0].shape))
    out = model.training_step({"images": images, "labels": labels})
    assert shapes == [torch.Size([4, 1 + 16, 32])]  # cls + 4 x 4 patches, no distillation token
    torch.testing.assert_close(out["loss"], F.cross_entropy(model.predict(images), labels))


def test_predict_averages_the_two_heads():
    model = make(distillation="hard").eval()
    images, _ = batch()
    cls, dist = model.student(images)
    assert (cls - dist).abs().max() > 0.1
    torch.testing.assert_close(model.predict(images), (cls + dist) / 2)


def test_teacher_is_frozen_and_stays_in_eval_mode():
    model = make(distillation="soft", model_ema=True)
    model.train()
    assert model.student.training and not model.teacher.training and not model.ema.training
    assert not any(m.training for m in [*model.teacher.modules(), *model.ema.modules()])
    stats = model.teacher.bn.running_mean.clone()
    images, labels = batch()
    model.training_step({"images": images, "labels": labels})["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert torch.equal(model.teacher.bn.running_mean, stats)  # eval-mode BatchNorm: no update
    assert all(p.grad is not None for p in model.student.parameters())
    optimized = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    assert optimized == {id(p) for p in model.student.parameters()}  # no teacher, no EMA


@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_teacher_sees_the_mixed_images(alphas):
    mixup, cutmix = alphas
    model = make(distillation="soft", mixup=mixup, cutmix=cutmix, teacher_img_size=16)
    images, labels = batch(b=8)
    np.random.seed(3)
    out = model.training_step({"images": images.clone(), "labels": labels})
    np.random.seed(3)
    kw = dict(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1, num_classes=K)
    mixed, targets = Mixup(**kw)(images.clone(), labels)
    assert (mixed - images).abs().max() > 0.1
    expected = F.interpolate(mixed, size=(16, 16), mode="bicubic", antialias=True)
    torch.testing.assert_close(model.teacher.seen[-1], expected)  # at its own 16 px
    cls, _ = model.student(mixed)
    torch.testing.assert_close(out["cls_loss"], -(targets * log_softmax(cls)).sum(-1).mean())


def test_model_ema_update_and_state():
    model = make(model_ema=True, model_ema_decay=0.9)
    before = model.ema.module.head.weight.clone()
    with torch.no_grad():
        model.student.head.weight.add_(1.0)
    model.after_optimizer_step(0, 10)
    expected = 0.9 * before + 0.1 * model.student.head.weight
    torch.testing.assert_close(model.ema.module.head.weight, expected)
    assert "ema.module.head.weight" in model.state_dict()  # saved in the trainer's checkpoints


@pytest.mark.parametrize("distillation", ["hard", "none"])
def test_export_loads_strictly_into_timm_with_equal_logits(distillation):
    model = make(distillation=distillation).eval()
    with torch.no_grad():  # make every exported tensor matter
        for p in model.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state, name, kwargs = model.export_classifier()
    assert name == (
        "deit_tiny_distilled_patch16_224" if distillation != "none" else model.backbone.name
    )
    json.dumps(kwargs)  # written as classifier.json
    timm_model = timm.create_model(name, pretrained=False, **kwargs).eval()
    timm_model.load_state_dict(state, strict=True)
    images, _ = batch()
    torch.testing.assert_close(timm_model(images), model.predict(images), atol=1e-5, rtol=1e-5)


def test_teacher_from_ssl_vit_export_and_from_official_style_file(tmp_path):
    trained = make().eval()
    export_timm(*trained.export_classifier(), tmp_path, "classifier")
    cfg = DeiTConfig(distillation="hard", num_classes=K, teacher_weights=str(tmp_path))
    images, _ = batch()
    torch.testing.assert_close(load_teacher(cfg)(images), trained.predict(images))

    cnn = timm.create_model("test_resnet", num_classes=K).eval()
    torch.save({"model": cnn.state_dict(), "epoch": 3}, tmp_path / "teacher.pth")
    cfg = DeiTConfig(
        num_classes=K, teacher="test_resnet", teacher_weights=str(tmp_path / "teacher.pth")
    )
    torch.testing.assert_close(load_teacher(cfg).eval()(images), cnn(images))
    with pytest.raises(ValueError, match="classes"):
        load_teacher(DeiTConfig(num_classes=7, teacher_weights=str(tmp_path)))


def test_config_errors():
    cfg = Config(method=DeiTConfig(distillation="soft", tau=0.0))
    cfg.train.batch_size = 7
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "method.teacher_weights" in msg and "method.tau" in msg and "train.batch_size" in msg
    validate(Config(method=DeiTConfig()))  # the default (supervised) config is valid


def test_supervised_view_is_deits_timm_pipeline_and_survives_posterize_0_bits():
    view = supervised_view(DataConfig(crop_scale=(0.08, 1.0)), 32)
    steps = {type(t).__name__: t for t in view.transform.transforms[1].transforms}
    assert steps["RandomResizedCropAndInterpolation"].scale == (0.08, 1.0)
    assert "ColorJitter" not in steps  # timm drops it under RandAugment, as in the DeiT runs
    ra, erase = steps["RandAugment"], steps["RandomErasing"]
    assert ra.num_layers == 2 and {(op.magnitude, op.magnitude_std) for op in ra.ops} == {(9, 0.5)}
    assert "PosterizeIncreasing" in [op.name for op in ra.ops]  # the 'inc1' operations
    assert (erase.probability, erase.mode) == (0.25, "pixel")
    image = (torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0)) * 255).byte()
    with seeded(0, 1, 7):
        a = view(image)["images"]
    with seeded(0, 1, 7):
        b = view(image)["images"]
    with seeded(0, 1, 8):
        c = view(image)["images"]
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    # magnitude 10 keeps 0 bits: timm's intended black image, where Pillow 13 would raise
    (op,) = [op for op in ra.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    pil = v2.ToPILImage()(image)
    assert np.asarray(op(pil)).max() == 0 and np.asarray(pil).max() > 0


# --- repeated augmentation ------------------------------------------------------------------


def per_process(sampler, batch_size, processes):
    """The index streams each process gets from `accelerator.prepare` (drop_last batching)."""
    batches = BatchSampler(sampler, batch_size, drop_last=True)
    return [
        [i for b in BatchSamplerShard(batches, processes, r) for i in b] for r in range(processes)
    ]


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_repeated_aug_sampler_through_accelerate_sharding(processes):
    n, b = 60, 4
    sampler = RepeatedAugSampler(n, processes, b, repeats=3, seed=5)
    sampler.set_epoch(2)
    assert len(sampler) == n
    streams = per_process(sampler, b, processes)
    taken = (n // b // processes) * processes * b
    assert sum(map(len, streams)) == taken
    counts = collections.Counter(i for s in streams for i in s)
    assert sum(c != 3 for c in counts.values()) <= 1  # every drawn index 3x, but the cut one
    assert len(counts) == -(-taken // 3)
    # DeiT's RASampler: the repeated list [a, a, a, b, b, b, ...] dealt round-robin (rep[r::P])
    one = RepeatedAugSampler(n, 1, b, repeats=3, seed=5)
    one.set_epoch(2)
    perm = list(dict.fromkeys(one))  # the epoch's permutation (prefix), in order
    rep = [i for i in perm for _ in range(3)]
    for r, stream in enumerate(streams):
        assert stream == rep[r::processes][: len(stream)]
    if processes == 3:  # the 3 copies of an image go to 3 different processes
        where = collections.defaultdict(set)
        for r, stream in enumerate(streams):
            for i in stream:
                where[i].add(r)
        assert all(len(where[i]) == 3 for i in counts if counts[i] == 3)


def test_repeated_aug_sampler_is_deterministic_per_epoch():
    sampler = RepeatedAugSampler(50, 2, 4, seed=0)
    orders = []
    for epoch in (0, 1, 1):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[1] == orders[2] and orders[0] != orders[1]
    other_seed = RepeatedAugSampler(50, 2, 4, seed=1)
    other_seed.set_epoch(1)
    assert list(other_seed) != orders[1]
