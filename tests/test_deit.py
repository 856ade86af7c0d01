"""DeiT: losses against hand computations, the frozen teacher, Mixup seen by the teacher, EMA,
export into timm's DeiT models, teacher loading (load_classifier), training checkpoints without
the teacher and their exact resume, and the repeated-augmentation sampler as it reaches each
process through Accelerate's batch sharding."""

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from accelerate.data_loader import BatchSamplerShard
from conftest import tiny
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from torch import nn
from torch.utils.data import BatchSampler
from torchvision.transforms import v2

from ssl_vit.backbone import Backbone
from ssl_vit.config import Config, ConfigError, DataConfig, validate
from ssl_vit.data import seeded
from ssl_vit.data.samplers import RepeatedAugSampler
from ssl_vit.data.transforms import supervised_view
from ssl_vit.methods.deit import DeiT, DeiTConfig
from ssl_vit.optim import param_groups
from ssl_vit.train.loop import fit
from ssl_vit.weights import CheckpointError, load_classifier, save_timm

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
    assert model.teacher is None and model.student.head_dist is None
    assert model.backbone.dist_token is None
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
    # two forwards (FORWARD), through heads perturbed above: logits beyond O(1) get 1e-5 relative
    torch.testing.assert_close(timm_model(images), model.predict(images), atol=1e-5, rtol=1e-5)


def test_load_classifier_each_accepted_form(tmp_path):
    images, _ = batch()
    trained = make(distillation="hard").eval()
    save_timm(*trained.export_classifier(), tmp_path / "classifier")  # an ssl_vit run's export
    for form in (tmp_path, tmp_path / "classifier", tmp_path / "classifier" / "model.safetensors"):
        got = load_classifier(form, "regnety_160", K)  # the JSON names the model, not `name`
        assert not got.training and type(got).__name__ == "VisionTransformerDistilled"
        torch.testing.assert_close(got(images), trained.predict(images))

    torch.manual_seed(0)
    cnn = timm.create_model("test_resnet", num_classes=K).eval()
    torch.save({"model": cnn.state_dict(), "epoch": 3}, tmp_path / "official.pth")  # DeiT style
    save_file(cnn.state_dict(), str(tmp_path / "plain.safetensors"))
    want = cnn(images)
    assert want.std() > 1e-2  # 1000 x assert_close's atol: other weights could not pass for these
    for form, name in [
        (tmp_path / "official.pth", "test_resnet"),
        (f"test_resnet={tmp_path / 'official.pth'}", ""),
        (f"test_resnet.tag={tmp_path / 'plain.safetensors'}", "regnety_160"),  # NAME wins
    ]:
        torch.testing.assert_close(load_classifier(form, name, K)(images), want)

    # the trainer's way: DeiTConfig.teacher names the timm model of teacher_weights
    kw = dict(num_classes=K, teacher="test_resnet", teacher_weights=str(tmp_path / "official.pth"))
    deit = DeiT(Backbone("vit_tiny_patch16_224", **TINY), DeiTConfig(distillation="soft", **kw))
    assert not any(p.requires_grad for p in deit.teacher.parameters())
    torch.testing.assert_close(deit.teacher(images), want)


def test_load_classifier_errors_name_the_file_and_the_fault(tmp_path):
    cnn = timm.create_model("test_resnet", num_classes=K)
    torch.save({"model": cnn.state_dict()}, tmp_path / "teacher.pth")
    vit, vit_state = tmp_path / "vit.pth", make().backbone.state_dict()
    torch.save({"model": vit_state}, vit)
    with pytest.raises(CheckpointError) as e:  # the wrong architecture's weights
        load_classifier(vit, "test_resnet", K)
    msg = str(e.value)
    assert msg.startswith(f"{vit}: does not fit timm test_resnet {{'num_classes': 5}}")
    assert f"\n  missing ({len(cnn.state_dict())}):\n    conv1" in msg
    assert f"\n  unexpected ({len(vit_state)}):\n    cls_token (1, 1, 32)" in msg
    assert msg.endswith("mis-shaped (0):\n  the file's top-level keys: ['model']")
    with pytest.raises(CheckpointError) as e:
        load_classifier(tmp_path / "teacher.pth", "test_resnet", 7)  # 7 classes, the file has 5
    assert str(e.value).startswith(f"{tmp_path / 'teacher.pth'}: does not fit timm test_resnet")
    assert "mis-shaped (2):\n    fc.weight checkpoint (5, 96) vs model (7, 96)" in str(e.value)
    save_timm(*make().eval().export_classifier(), tmp_path / "classifier")
    with pytest.raises(CheckpointError, match=r"model.safetensors: .* of 5 classes, not 7"):
        load_classifier(tmp_path, "", 7)
    with pytest.raises(
        CheckpointError, match=r"teacher.pth: no JSON naming its model .* NAME=PATH"
    ):
        load_classifier(tmp_path / "teacher.pth")  # no name anywhere
    (tmp_path / "empty").mkdir()  # a run directory before its export
    with pytest.raises(CheckpointError, match=r"empty: a directory without classifier/"):
        load_classifier(tmp_path / "empty", "test_resnet")
    with pytest.raises(CheckpointError, match=r"nope.pth: not found \(the weights file"):
        load_classifier(f"test_resnet={tmp_path / 'nope.pth'}")
    with pytest.raises(CheckpointError, match=r"cannot build the timm model no_such_model"):
        load_classifier(tmp_path / "teacher.pth", "no_such_model")


def test_state_dict_leaves_the_teacher_out_and_loads_without_it():
    model = make(distillation="soft", model_ema=True)
    state = model.state_dict()
    kept = [f"student.{k}" for k in model.student.state_dict()]
    assert [*state] == kept + [f"ema.{k}" for k in model.ema.state_dict()]  # all but the teacher
    want = {"student.backbone.dist_token", "student.head_dist.weight", "ema.module.head.weight"}
    assert want <= {*state}
    assert len(model.teacher.state_dict()) == 7  # fc, bn and its buffers: all left out
    other = make(seed=1, distillation="soft", model_ema=True)
    teacher = {k: v.clone() for k, v in other.teacher.state_dict().items()}
    assert not torch.equal(teacher["fc.weight"], model.teacher.fc.weight)
    other.load_state_dict(state, strict=True)  # no teacher keys: the teacher keeps its own
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in other.state_dict().items())
    assert all(torch.equal(v, other.teacher.state_dict()[k]) for k, v in teacher.items())
    with_teacher = state | {f"teacher.{k}": v for k, v in model.teacher.state_dict().items()}
    other.load_state_dict(with_teacher, strict=True)  # an older checkpoint, with the teacher
    torch.testing.assert_close(other.teacher.fc.weight, model.teacher.fc.weight)
    wrapped = nn.ModuleDict({"module": model})  # at a prefix, as under DDP
    assert not [k for k in wrapped.state_dict() if k.startswith("module.teacher.")]
    wrapped.load_state_dict(wrapped.state_dict(), strict=True)


# --- training checkpoints of a distilled run -------------------------------------------------


def distilled_run(run_dir: Path, teacher: Path, **train) -> Config:
    method = dict(num_classes=10, teacher="test_resnet", teacher_weights=str(teacher))
    method = DeiTConfig(distillation="hard", model_ema_decay=0.9, **method)
    return tiny(run_dir, method, **dict(epochs=10, lr=1e-3) | train)


def test_checkpoints_hold_no_teacher_and_resume_exactly(tmp_path):
    def teacher_file(seed: int) -> Path:
        torch.manual_seed(seed)
        path = tmp_path / f"teacher{seed}.pth"
        torch.save({"model": timm.create_model("test_resnet", num_classes=10).state_dict()}, path)
        return path

    n = 3  # 4 steps per epoch: the resume lands mid-epoch
    schedule = dict(save_every_steps=n, keep_last=100)
    straight = tmp_path / "straight"
    fit(distilled_run(straight, teacher_file(0), max_steps=2 * n, **schedule))

    ckpt = straight / "checkpoints" / f"step_{n:07d}"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert not [k for k in saved if "teacher" in k]
    assert {"student.backbone.dist_token", "ema.module.head_dist.weight"} <= {*saved}
    teacher = load_classifier(teacher_file(0), "test_resnet", 10).state_dict()
    save_file(saved | {f"teacher.{k}": v for k, v in teacher.items()}, tmp_path / "with.st")
    size, with_teacher = (ckpt / "model.safetensors").stat().st_size, (tmp_path / "with.st").stat()
    print(f"model.safetensors: {size} bytes; with the teacher: {with_teacher.st_size} bytes")
    assert size * 5 < with_teacher.st_size

    resumed = tmp_path / "resumed"
    fit(distilled_run(resumed, teacher_file(0), max_steps=2 * n, resume=str(ckpt), **schedule))

    def state(run: Path) -> dict[str, torch.Tensor]:
        return load_file(str(run / "checkpoints" / f"step_{2 * n:07d}" / "model.safetensors"))

    def losses(run: Path) -> list[tuple[float, float]]:
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [
            (r["loss"], r["distill_loss"]) for r in rows if r.get("step", 0) > n and "loss" in r
        ]

    a, b = state(straight), state(resumed)
    assert a.keys() == b.keys() == saved.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert len(losses(resumed)) == n and losses(resumed) == losses(straight)
    assert min(d for _, d in losses(straight)) > 0.1  # the teacher takes part in the loss
    # the exported classifier is the student's, and loads as a classifier (a run directory)
    classifier = load_classifier(resumed, "", 10)
    assert torch.equal(classifier.state_dict()["dist_token"], a["student.backbone.dist_token"])

    # control: the teacher is rebuilt from its file, not restored: another teacher diverges
    control = tmp_path / "control"
    other = distilled_run(control, teacher_file(1), max_steps=2 * n, resume=str(ckpt), **schedule)
    other.train.resume_changes = "allow"  # method.teacher_weights changed
    fit(other)
    c = state(control)
    assert not torch.equal(a["student.head_dist.weight"], c["student.head_dist.weight"])


def test_decode_on_device_view_trains_and_resumes_exactly(tmp_path):
    """RandAugment and random erasing on the device (here the CPU), drawn per batch from
    (seed, epoch, batch, rank): a run resumed mid-epoch equals the straight one; the CPU view
    gives other draws."""
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    torch.save({"model": timm.create_model("test_resnet", num_classes=10).state_dict()}, teacher)
    n, schedule = 3, dict(save_every_steps=3, keep_last=100)

    def run(name: str, decode: bool = True, **train) -> Path:
        cfg = distilled_run(tmp_path / name, teacher, **{"max_steps": 2 * n, **schedule, **train})
        cfg.data.decode_on_device = decode
        fit(cfg)
        return tmp_path / name

    def losses(run_dir: Path) -> dict[int, float]:
        rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    straight = run("straight")
    resumed = run("resumed", resume=str(straight / "checkpoints" / f"step_{n:07d}"))
    final = f"checkpoints/step_{2 * n:07d}/model.safetensors"
    a, b = load_file(str(straight / final)), load_file(str(resumed / final))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [losses(resumed)[s] for s in range(n + 1, 2 * n + 1)] == [
        losses(straight)[s] for s in range(n + 1, 2 * n + 1)
    ]
    assert losses(run("cpu", decode=False, max_steps=1))[1] != losses(straight)[1]


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


def recipe(name: str, monkeypatch) -> Config:
    """recipes/`name`.py's config, as the file builds it (its base recipe importable)."""
    import importlib.util

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    monkeypatch.syspath_prepend(str(recipes))
    spec = importlib.util.spec_from_file_location(name, recipes / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.config()


def on(cfg: Config, path: Path, **data) -> Config:
    """`cfg` reading `path`, without evaluations."""
    cfg.data = DataConfig(path=str(path), num_workers=0, **data)
    cfg.train.eval_every_epochs = 0
    return cfg


@pytest.mark.parametrize("name", ["deit_small", "deit_small_distilled", "deit_base_distilled"])
def test_deit_recipes_count_the_classes_of_the_data_and_a_stated_count_must_match(
    name, tmp_path, monkeypatch
):
    """Before: the recipes' num_classes=1000 trained a 1000-way head on a 5-class folder (first
    loss ln 1000 = 6.9) without a word; 12 classes on 10 passed too."""
    from test_trainer import write_image_folder

    from ssl_vit.registry import prepare

    write_image_folder(tmp_path / "five", 10, {})  # class_0 .. class_4
    cfg = on(recipe(name, monkeypatch), tmp_path / "five")
    prepare(cfg)
    assert cfg.method.num_classes == 5
    for stated in (1000, 4):
        cfg = on(recipe(name, monkeypatch), tmp_path / "five")
        cfg.method.num_classes = stated
        with pytest.raises(ConfigError) as e:
            prepare(cfg)
        assert str(e.value).endswith(
            f"method.num_classes: {stated} classes, but the training split 'train' (data.split) "
            f"of {tmp_path / 'five'} has 5 (class_0, class_1, class_2, class_3, class_4); set "
            "method.num_classes 0 to take the data's count"
        )
    cfg = on(recipe(name, monkeypatch), tmp_path / "five")
    cfg.method.num_classes = 5  # stated and right
    prepare(cfg)
    assert cfg.method.num_classes == 5


def test_classes_without_labels_or_from_a_streams_metadata(tmp_path):
    """An unlabelled folder: no labels, whatever num_classes says (before: "set
    method.num_classes", also when set). A stream: the classes of a Parquet file's ClassLabel
    (a Hub repository's layout, no make_shards index), else the stated count (before: refused
    with "set method.num_classes" either way)."""
    import datasets
    import make_shards
    from test_trainer import write_image_folder

    from ssl_vit.data import DataError
    from ssl_vit.registry import prepare

    write_image_folder(tmp_path / "five", 10, {})
    files = sorted((tmp_path / "five").rglob("img_*"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in files:
        (flat / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    for stated in (0, 8):
        cfg = on(tiny(tmp_path / "run", "deit"), flat)
        cfg.method.num_classes = stated
        with pytest.raises(DataError) as e:
            prepare(cfg)
        assert str(e.value) == (
            f"deit trains a classifier, but the training split 'train' (data.split) of {flat} "
            "has no labels (an image folder needs class sub-folders; a dataset, a class column: "
            "data.label_column)"
        )

    hub = tmp_path / "hub" / "data"  # a Hub repository's Parquet files, their ClassLabel
    hub.mkdir(parents=True)
    names = ["cat", "dog", "fox", "owl"]
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    rows = {"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files[:4]]}
    rows["label"] = [0, 1, 2, 3]
    datasets.Dataset.from_dict(rows, features=features).to_parquet(hub / "train-00000.parquet")
    cfg = on(tiny(tmp_path / "run", "deit"), hub.parent, streaming=True)
    cfg.method.num_classes = 0
    prepare(cfg)
    assert cfg.method.num_classes == 4
    cfg.method.num_classes = 10
    with pytest.raises(ConfigError, match=r"num_classes: 10 classes, .* has 4 \(cat, dog, fox"):
        prepare(cfg)

    shards = tmp_path / "shards"  # WebDataset shards whose index lists no classes
    make_shards.main([str(tmp_path / "five"), str(shards), "--format", "webdataset"])
    index = json.loads((shards / "_index.json").read_text())
    index["splits"]["train"]["classes"] = []
    (shards / "_index.json").write_text(json.dumps(index))
    cfg = on(tiny(tmp_path / "run", "deit"), shards, streaming=True)
    cfg.method.num_classes = 0
    with pytest.raises(DataError, match=r"names no classes .* to count; set method.num_classes$"):
        prepare(cfg)
    cfg.method.num_classes = 8
    prepare(cfg)
    assert cfg.method.num_classes == 8
