"""The typed config tree, `--section.field value` overrides, `--help`, and validation.

A run is described by one `Config`: `model`, `data`, `train` and `method` sections. The `method`
section is the method's own dataclass (e.g. `MAEConfig`), so `--help` lists exactly the fields
of the method a recipe runs. Field docs are the string literal written under each field.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import re
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """One or more bad config values or override flags; the message lists every one."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors))


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224"
    """timm model name of the ViT backbone (vit_tiny/small/base/large_patch16_224,
    vit_huge_patch14_224, ...; the RoPE vit_small/base/large_patch16_dinov3[_qkvb] for DINO and
    DINOv2)."""
    img_size: int = 224
    """Training image side in pixels; must be a multiple of the patch size."""
    patch_size: int = 0
    """Patch side in pixels; 0 keeps the timm model's own."""
    embed_dim: int = 0
    """Token width; 0 keeps the timm model's own."""
    depth: int = 0
    """Number of transformer blocks; 0 keeps the timm model's own."""
    num_heads: int = 0
    """Attention heads per block; 0 keeps the timm model's own."""
    drop_path: float = 0.0
    """Stochastic-depth rate of the last block (linearly increasing over depth)."""
    grad_checkpointing: bool = False
    """Recompute each backbone block's activations in the backward pass instead of keeping them
    (activation checkpointing): about a third more compute for a fraction of the activation memory;
    for ViT-L/H at batch sizes that do not fit otherwise. Gradients are unchanged."""
    init: str = ""
    """Continued pretraining: start from this checkpoint's weights (anything --checkpoint takes)
    instead of a fresh initialisation; model.name and the sizes become the checkpoint's, the
    position embedding is brought to model.img_size. MAE takes the decoder too when the file has
    it (`_full` files, our MAE runs), DINO its student and teacher (and heads), DINOv2 the
    backbone for both networks, DeiT the student (and heads of the same classes)."""

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `timm.create_model(name, **kw)`: what differs from the name."""
        kw: dict[str, Any] = {"img_size": self.img_size}
        for key in ("patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, key):
                kw[key] = getattr(self, key)
        if self.drop_path:
            kw["drop_path_rate"] = self.drop_path
        return kw

    def resolved_patch_size(self) -> int | None:
        """The patch size this config gives: the override, else the one in the timm name."""
        if self.patch_size:
            return self.patch_size
        m = re.search(r"patch(\d+)", self.name)
        return int(m.group(1)) if m else None

    def errors(self) -> list[str]:
        e = []
        patch = self.resolved_patch_size()
        if self.img_size <= 0:
            e.append(f"model.img_size: must be positive, got {self.img_size}")
        elif patch is None:
            e.append(
                f"model.patch_size: cannot read the patch size from model.name {self.name!r}; "
                "set it"
            )
        elif self.img_size % patch:
            e.append(f"model.img_size: {self.img_size} is not divisible by the patch size {patch}")
        e += field_errors(self, "model", {">= 0": "patch_size embed_dim depth num_heads"})
        if self.embed_dim and self.num_heads and self.embed_dim % self.num_heads:
            e.append(
                f"model.embed_dim: {self.embed_dim} is not divisible by model.num_heads "
                f"{self.num_heads}"
            )
        where = self.init.partition("=")[2] or self.init  # NAME=PATH or a path
        if self.init and not (Path(self.init).exists() or Path(where).exists()):
            e.append(f"model.init: {self.init!r} not found (a run directory, a file or NAME=PATH)")
        return e + field_errors(self, "model", {"in [0, 1)": "drop_path"})


EVAL_SPLITS = ("val", "validation", "test")
"""The held-out splits data.val_split 'auto' looks for, in this order (ImageNet folders' `val`,
the Hugging Face convention's `validation`, then `test`)."""


@dataclass
class EvalDataConfig:
    """The data an evaluation reads (k-NN, embeddings, pictures): where, which splits, how images
    are decoded and normalised; no training augmentation."""

    path: str = "synthetic"
    """'synthetic' (built-in, no files), an image folder (class sub-folders optional; uses its
    'train' sub-folder when there is one), a saved Hugging Face dataset directory, or 'hf:NAME'
    for a Hugging Face Hub dataset; segmentation (`ssl-vit segprobe`) also reads the ADE20K and
    VOC layouts, images/ + masks/ folders, and 'digits' (scikit-learn's)."""
    split: str = "train"
    """Training split (the k-NN bank): a sub-folder of an image folder, or a Hugging Face split."""
    val_split: str = "auto"
    """Labeled held-out split evaluations run on; auto = the first of val, validation, test the
    data has (synthetic: its own held-out images). Evaluating on the training images needs
    naming data.split here, and results then say held_out false."""
    image_column: str = "image"
    """Image column of a Hugging Face dataset."""
    label_column: str = "label"
    """Label column of a Hugging Face dataset ('' when there is none)."""
    mask_column: str = "annotation"
    """Mask column of a Hugging Face segmentation dataset (`ssl-vit segprobe`)."""
    reduce_zero_label: Literal["auto", "yes", "no"] = "auto"
    """Segmentation masks: 0 is 'other', ignored, and class k is stored as k + 1; auto = yes for
    the ADE20K layout and scene_parse_150, else no."""
    synthetic_size: int = 10_000
    """Number of images in the synthetic training split."""
    synthetic_classes: int = 10
    """Number of classes of the synthetic dataset (10 to 16 shapes and textures)."""
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    """Resize interpolation."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel normalisation mean."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel normalisation std."""
    num_workers: int = 8
    """Data-loader worker processes per device (0 loads in the main process)."""
    pin_memory: bool = True
    """Pin host memory for faster copies to the GPU (ignored on CPU)."""
    max_bad_fraction: float = 0.5
    """Stop with an error when more than this fraction of images cannot be read."""

    def errors(self) -> list[str]:
        e = []
        if self.path not in ("synthetic", "digits") and not self.path.startswith("hf:"):
            if not Path(self.path).exists():
                e.append(
                    f"data.path: {self.path!r} does not exist (use 'synthetic', a folder, a saved "
                    "Hugging Face dataset directory, or 'hf:NAME')"
                )
        e += field_errors(self, "data", {"positive": "synthetic_size"})
        if not 10 <= self.synthetic_classes <= 16:
            e.append(f"data.synthetic_classes: must be in [10, 16], got {self.synthetic_classes}")
        if any(s <= 0 for s in self.std):
            e.append(f"data.std: must be positive, got {self.std}")
        e += field_errors(self, "data", {">= 0": "num_workers"})
        if not 0 < self.max_bad_fraction <= 1:
            e.append(f"data.max_bad_fraction: must be in (0, 1], got {self.max_bad_fraction}")
        return e


@dataclass
class DataConfig(EvalDataConfig):
    """The data of a training run: EvalDataConfig's and the training augmentation."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range."""
    hflip: float = 0.5
    """Horizontal-flip probability."""
    timeout: float = 600
    """Seconds to wait for a batch from the loader workers before stopping with an error (a
    stuck worker or file system); 0 waits forever. Used when num_workers > 0."""
    decode_on_device: bool = False
    """Loader workers only read file bytes; decoding (nvJPEG on GPU) and the method's view (crops,
    flip; DINO's colour jitter, grayscale, blur, solarisation; DeiT's and fine-tuning's
    RandAugment and random erasing; normalisation) run batched on the training device, for GPUs
    that outrun CPU decoding. Every method; the same augmentation distribution as on the CPU."""
    streaming: bool = False
    """Read data.path as a stream instead of a map-style dataset: a folder of WebDataset .tar or
    Parquet shards (tools/make_shards.py; also a Hugging Face dataset repository on disk), or
    'hf:NAME' streamed from the Hub. Each epoch's samples are dealt to the processes and their
    loader workers in runs of whole batches; what is left over is counted (README § Streaming)."""
    shuffle_buffer: int = 1000
    """A stream's loader workers shuffle their samples within consecutive windows of this many
    (0: shard order only). A resume re-reads the window it stopped in: nothing lost or repeated."""
    samples_per_epoch: int = 0
    """Samples an epoch of a stream takes over all processes (0: the whole dataset, counted from
    its shards), rounded down to whole global batches; the schedule counts epochs of this size."""

    def errors(self) -> list[str]:
        e = super().errors()
        e += field_errors(self, "data", {">= 0": "timeout shuffle_buffer samples_per_epoch"})
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            e.append(f"data.crop_scale: need 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 <= self.hflip <= 1:
            e.append(f"data.hflip: must be a probability in [0, 1], got {self.hflip}")
        return e


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Run directory: config, checkpoints, exported backbone, metrics and TensorBoard events."""
    epochs: float = 100
    """Passes over the training data; the learning-rate schedule spans them."""
    steps: int = 0
    """The run's length in optimizer steps, which its schedule spans (iteration-based protocols:
    the segmentation probe's 40,000); 0 = train.epochs."""
    max_steps: int = 0
    """Stop after this many optimizer steps (the schedule still spans train.epochs); 0 = none."""
    batch_size: int = 64
    """Images per device per forward pass."""
    effective_batch: int = 0
    """Images per optimizer step over all devices; reached by gradient accumulation computed from
    batch_size and the process count. 0 = batch_size x processes x accum_steps."""
    accum_steps: int = 1
    """Gradient-accumulation steps, used when effective_batch is 0."""
    base_lr: float = 1.5e-4
    """lr = base_lr x effective batch / lr_batch_divisor."""
    lr_batch_divisor: int = 256
    """Batch size at which lr equals base_lr (256 for MAE/DINO, 512 for DeiT)."""
    lr: float = 0.0
    """Absolute peak learning rate; overrides base_lr when > 0."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_epochs: float = 40
    """Linear warmup length in epochs (per iteration)."""
    optimizer: Literal["adamw", "sgd", "lars"] = "adamw"
    """adamw (with the method's betas), sgd or lars (with train.momentum)."""
    momentum: float = 0.9
    """Momentum of sgd and lars."""
    weight_decay: float = 0.05
    """Weight decay (never applied to biases, norms, position embeddings and tokens)."""
    weight_decay_end: float | None = None
    """Weight decay at the end of a per-iteration cosine schedule from train.weight_decay (DINO:
    0.04 -> 0.4); none keeps it constant."""
    clip_grad: float = 0.0
    """Clip gradients to this norm; 0 = no clipping."""
    clip_mode: Literal["global", "param"] = "global"
    """global: the norm of all gradients together; param: each parameter's own (DINO's)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision: auto = bf16 on GPU, fp32 on CPU."""
    compile: bool = False
    """Compile the method's training step (forward and loss; backward through AOT autograd) with
    torch.compile and static shapes: one compilation per run, every crop resolution in one graph.
    The first step takes the compile time (a minute or more)."""
    compile_backend: str = "inductor"
    """torch.compile backend of train.compile: inductor (fused kernels; needs a C++ compiler on
    CPU), or aot_eager / eager to debug a compile problem."""
    seed: int = 0
    """Seed of initialisation, data order, augmentation and masking."""
    log_every: int = 20
    """Log loss, lr, grad norm and img/s every this many optimizer steps."""
    log_with: str = "tensorboard"
    """Experiment trackers, comma-separated, passed to Accelerate: tensorboard (events in tb/),
    wandb, mlflow, aim, comet_ml, clearml, dvclive, swanlab, trackio when installed; 'all' (every
    installed one) or 'none'. Tags are grouped train/... and eval/...; metrics.jsonl is always
    written."""
    eval_every_epochs: int = 0
    """Evaluate on data.val_split every this many epochs and at the end: top-1/top-5 for methods
    that classify, k-NN (k=20, T=0.07) of the exported backbone for the others; 0 = never."""
    image_every_epochs: int = 0
    """Write MAE reconstructions and attention maps of 8 fixed validation images to TensorBoard
    every this many epochs and at the end; 0 = never."""
    save_every_epochs: float = 1
    """Save a resumable checkpoint every this many epochs (0 = only at the end)."""
    save_every_steps: int = 0
    """Also save every this many optimizer steps (0 = off)."""
    keep_last: int = 2
    """Number of most recent checkpoints kept; at least 2, so that a damaged newest one leaves one
    to fall back to."""
    resume: str = ""
    """'auto' continues from the newest complete checkpoint in output_dir (or starts fresh when
    there is none), falling back to the one before when the newest is damaged; or a checkpoint
    directory."""
    resume_changes: Literal["refuse", "allow"] = "refuse"
    """On resume, a config that differs from the checkpoint's in what changes the schedule or the
    data order (epochs, batch sizes, lr, seed, data, mask ratio, ...) is refused unless 'allow'
    (then the changes are logged). Architecture and method changes are always refused."""
    discard_newer: bool = False
    """Resuming from a checkpoint older than the run's newest: delete the newer ones, which this
    run's saves would replace (without it such a resume is refused)."""
    overwrite: bool = False
    """Replace a previous run in output_dir instead of refusing to start."""

    def errors(self) -> list[str]:
        e = field_errors(
            self,
            "train",
            {
                "positive": "batch_size accum_steps lr_batch_divisor log_every",
                ">= 2": "keep_last",
                ">= 0": "effective_batch steps max_steps save_every_steps eval_every_epochs "
                "image_every_epochs lr min_lr base_lr weight_decay momentum clip_grad "
                "save_every_epochs warmup_epochs",
            },
        )
        if self.epochs <= 0:
            e.append(f"train.epochs: must be positive, got {self.epochs}")
        elif self.warmup_epochs > self.epochs:
            e.append(
                f"train.warmup_epochs: {self.warmup_epochs} exceeds train.epochs {self.epochs}"
            )
        if self.weight_decay_end is not None and self.weight_decay_end < 0:
            e.append(f"train.weight_decay_end: must be >= 0, got {self.weight_decay_end}")
        if self.lr == 0 and self.base_lr == 0:
            e.append("train.base_lr: must be positive when train.lr is 0")
        if self.resume and self.resume != "auto" and not Path(self.resume).is_dir():
            e.append(f"train.resume: {self.resume!r} is neither 'auto' nor a checkpoint directory")
        if self.resume and self.overwrite:
            e.append("train.overwrite: cannot be combined with train.resume")
        e += self.tracker_errors()
        if self.compile:
            from torch._dynamo import list_backends  # torch only when compiling: --help is fast

            if self.compile_backend not in list_backends(exclude_tags=()):
                e.append(
                    f"train.compile_backend: unknown torch.compile backend "
                    f"{self.compile_backend!r}; known: "
                    f"{', '.join(['eager', 'aot_eager', *list_backends()])}"
                )
        return e

    def trackers(self) -> list[str]:
        """train.log_with as Accelerate's `log_with` list ([] for none)."""
        names = [n.strip() for n in self.log_with.split(",") if n.strip()]
        return [] if names == ["none"] else names

    def tracker_errors(self) -> list[str]:
        from accelerate.tracking import get_available_trackers  # only when validating a run
        from accelerate.utils import LoggerType

        known = [t.value for t in LoggerType]
        installed = [str(getattr(t, "value", t)) for t in get_available_trackers()]
        e = []
        for name in self.trackers():
            if name not in known:
                e.append(f"train.log_with: unknown tracker {name!r}; known: {known + ['none']}")
            elif name != "all" and name not in installed:
                e.append(
                    f"train.log_with: {name} is not installed (pip install {name}); "
                    f"installed: {installed}"
                )
        return e


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: Any = None
    """The method's own config dataclass (e.g. MAEConfig); its class attribute `name` picks it."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = {"name": self.method.name, **dataclasses.asdict(self.method)}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any], method_configs: dict[str, type]) -> Config:
        """Rebuild a config written by `to_dict` (e.g. a run's config.json); `method_configs`
        maps a method name to its config dataclass (ssl_vit.registry.method_configs())."""
        method = dict(d["method"])
        name = method.pop("name")
        if name not in method_configs:
            known = sorted(method_configs)
            raise ConfigError([f"method.name: unknown method {name!r}; known: {known}"])
        cfg = cls(method=method_configs[name]())
        apply_overrides(cfg, flatten({k: v for k, v in d.items() if k != "method"}))
        apply_overrides(cfg, flatten({"method": method}))
        return cfg


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 4}, "method": {"deit": {"mixup": 0}}} -> {"train.epochs": 4,
    "method.deit.mixup": 0}: the override keys of a nested dict (config.json)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_config(path: str) -> dict[str, Any]:
    """The `section.field` values of a config file (`--config`): JSON (a run's config.json, or
    --print-config's output), or YAML for .yaml / .yml (PyYAML, which Accelerate and datasets
    already depend on; safe_load: no objects built). Nested sections are flattened."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError([f"--config: {path}: no such file"])
    try:
        text = file.read_text()
        d = yaml.safe_load(text) if file.suffix in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(
            [f"--config: {path}: not valid {file.suffix[1:] or 'JSON'} ({e})"]
        ) from None
    if not isinstance(d, dict):
        raise ConfigError([f"--config: {path}: holds a {type(d).__name__}, not sections"])
    return flatten(d)


# ---------------------------------------------------------------------------------------------
# Introspection: the flat list of `section.field` options with type, default and doc.


@dataclass
class Option:
    key: str
    type: Any
    default: Any
    doc: str


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (attribute docstrings), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for prev, node in zip(body, body[1:], strict=False):
            if (
                isinstance(prev, ast.AnnAssign)
                and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def options(cfg: Any) -> list[Option]:
    """Every overridable field of `cfg` — a Config, or any dataclass whose fields are sections (a
    command's own root, like the bench's) — in declaration order. A section's field that is
    itself a dataclass (fine-tuning's `method.deit`) contributes its fields under its name."""
    out = []
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if dataclasses.is_dataclass(obj):
            out += _fields(obj, section.name)
    return out


def _fields(obj: Any, prefix: str) -> list[Option]:
    hints = typing.get_type_hints(type(obj))
    docs = field_docs(type(obj))
    out = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            out += _fields(value, key)
        else:
            out.append(Option(key, hints[f.name], value, docs.get(f.name, "")))
    return out


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_name(args[0])},...]"
        return "tuple[" + ",".join(type_name(a) for a in args) + "]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any) -> Any:
    """Convert a command-line string (or JSON value) to `tp`; ValueError says what was expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value in (None, "none", "None", ""):
                    return None
                continue
            try:
                return convert(value, arg)
            except ValueError:
                pass
        raise ValueError(f"expected {type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        items = value if isinstance(value, list | tuple) else str(value).replace(",", " ").split()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0]) for v in items)
        if len(items) != len(args):
            raise ValueError(
                f"expected {len(args)} comma-separated values ({type_name(tp)}), got {value!r}"
            )
        return tuple(convert(v, a) for v, a in zip(items, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected int, got {value!r}")
        try:
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        except ValueError:
            raise ValueError(f"expected int, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected float, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected float, got {value!r}") from None
    if tp is str:
        return str(value)
    raise ValueError(f"unsupported field type {tp!r}")


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Set `section.field` values in place; every unknown or ill-typed key is reported together."""
    known = {o.key: o for o in options(cfg)}
    errors = []
    for key, raw in overrides.items():
        opt = known.get(key)
        if opt is None:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            errors.append(f"--{key}: unknown option{hint}")
            continue
        try:
            value = convert(raw, opt.type)
        except ValueError as e:
            errors.append(f"--{key}: {e}")
            continue
        *path, name = key.split(".")
        target = cfg
        for part in path:
            target = getattr(target, part)
        setattr(target, name, value)
    if errors:
        raise ConfigError(errors)
    return cfg


def parse_args(argv: list[str]) -> tuple[dict[str, str], bool]:
    """Split `--section.field value` / `--section.field=value` flags into a dict; also `--help`."""
    overrides: dict[str, str] = {}
    errors = []
    want_help = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            want_help = True
            i += 1
            continue
        if not arg.startswith("--"):
            errors.append(f"{arg!r}: expected an option of the form --section.field value")
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                errors.append(f"--{key}: missing value")
                i += 1
                continue
            value = argv[i + 1]
            i += 1
        overrides[key] = value
        i += 1
    if errors:
        raise ConfigError(errors)
    return overrides, want_help


def pop_flag(argv: list[str], flag: str, default: str = "") -> tuple[str, list[str]]:
    """Take `--flag VALUE` (or `--flag=VALUE`) out of argv: (value or `default`, the rest).

    For the flags that choose a command's shape before the `--section.field` overrides are parsed
    (--method, --checkpoint, --protocol)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return default, list(argv)


def help_text(cfg: Any, prog: str) -> str:
    """Every field with its type, default and doc, grouped by section."""
    lines = [f"usage: {prog} [--section.field VALUE ...]", ""]
    section = None
    for opt in options(cfg):
        sec = opt.key.split(".")[0]
        if sec != section:
            section = sec
            title = f"{sec} ({cfg.method.name})" if sec == "method" else sec
            lines.append(f"{title}:")
        default = ",".join(map(str, opt.default)) if isinstance(opt.default, tuple) else opt.default
        lines.append(f"  --{opt.key} {type_name(opt.type)}  (default: {default})")
        if opt.doc:
            lines += ["      " + ln for ln in textwrap.wrap(opt.doc, 90)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Validation: every bad value is found before any work starts and reported together.

RULES: dict[str, Callable[[Any], bool]] = {
    "positive": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    ">= 2": lambda v: v >= 2,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 1)": lambda v: 0 < v < 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "each in [0, 1)": lambda v: all(0 <= x < 1 for x in v),
    "each >= 1": lambda v: bool(v) and all(x >= 1 for x in v),
}
"""The value rules configs state, by the words their messages use."""


def field_errors(obj: Any, section: str, rules: dict[str, str]) -> list[str]:
    """`section.key: must be RULE, got VALUE` for every field of `obj` breaking its rule; `rules`
    maps a rule of RULES to the space-separated field names it applies to."""
    errors = []
    for rule, keys in rules.items():
        words = f"each must be {rule[5:]}" if rule.startswith("each ") else f"must be {rule}"
        for key in keys.split():
            if not RULES[rule](getattr(obj, key)):
                errors.append(f"{section}.{key}: {words}, got {getattr(obj, key)}")
    return errors


def validate(cfg: Config) -> Config:
    """Raise ConfigError listing every invalid value of `cfg`: each section checks its own
    fields, the method's config seeing the whole run."""
    e = cfg.model.errors() + cfg.data.errors() + cfg.train.errors()
    if cfg.method is None:
        e.append("method: no method config given")
    else:
        e += cfg.method.errors(cfg)
    if e:
        raise ConfigError(e)
    return cfg
