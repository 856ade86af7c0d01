"""Weights in and out: any checkpoint users bring to `--checkpoint` -> a Backbone or a timm
classifier (loaded safely and strictly, through the key map of its official family), and our
exports in timm's own pretrained layout, written atomically. Exports of earlier versions
(`backbone.safetensors` + `backbone.json`) are still read.

    io.py        safe readers (weights_only / safetensors) and atomic writers
    paths.py     what a --checkpoint value names: timm's pretrained layout, NAME=PATH, JSON specs
    run.py       a run's checkpoint folders as weights (saving them is ssl_vit.train.checkpoint's)
    family.py    what one official family declares (`Family`)
    mae.py dino.py deit.py dinov2.py dinov3.py timm_vit.py    one key map per official family
    load.py      load_pretrained / load_timm / load_classifier, the registry FAMILIES
    export.py    save_timm, export_backbone and the `ssl-vit export` / `import` functions

A new family is one module holding a `Family` and one line in load.FAMILIES. The public names
below are this package's API; import them from `ssl_vit.weights`.
"""

from ssl_vit.weights.deit import classifier_keys, distilled_backbone, distilled_name
from ssl_vit.weights.dinov2 import dinov2_keys, official_dinov2
from ssl_vit.weights.dinov3 import dinov3_keys, official_dinov3
from ssl_vit.weights.export import (
    CHECKPOINT_HELP,
    LoadConfig,
    export_backbone,
    export_checkpoint,
    import_checkpoint,
    save_timm,
)
from ssl_vit.weights.family import Family, unwrapped
from ssl_vit.weights.io import (
    CheckpointError,
    UnsafeCheckpointError,
    fsync_dir,
    load_plain,
    read_checkpoint,
    shareable,
    write_atomic,
    write_text_atomic,
)
from ssl_vit.weights.load import (
    FAMILIES,
    WHICH,
    Pretrained,
    backbone_keys,
    load_classifier,
    load_pretrained,
    load_strict,
    load_timm,
    official_interp,
    read_pretrained,
    resample_to_grid,
)
from ssl_vit.weights.paths import (
    BACKBONE,
    BACKBONE_CONFIG,
    BACKBONE_WEIGHTS,
    CLASSIFIER,
    CLASSIFIER_WEIGHTS,
    POS_INTERP,
    TIMM_CONFIG,
    TIMM_WEIGHTS,
    TIMM_WEIGHTS_BIN,
    architecture,
    parse_checkpoint,
    recorded_interp,
    timm_weights,
    weights_and_spec,
)
from ssl_vit.weights.run import (
    CHECKPOINTS,
    COMPLETE,
    EXPORTED,
    RUN_CONFIG,
    RUN_STATE,
    RUN_WEIGHTS,
    STUDENTS,
    checkpoint_backbone,
    complete_checkpoints,
    exclude_from_state_dict,
    latest_checkpoint,
    training_checkpoint,
)
from ssl_vit.weights.timm_vit import infer_architecture

__all__ = [
    "BACKBONE",
    "BACKBONE_CONFIG",
    "BACKBONE_WEIGHTS",
    "CHECKPOINTS",
    "CHECKPOINT_HELP",
    "CLASSIFIER",
    "CLASSIFIER_WEIGHTS",
    "COMPLETE",
    "EXPORTED",
    "FAMILIES",
    "POS_INTERP",
    "RUN_CONFIG",
    "RUN_STATE",
    "RUN_WEIGHTS",
    "STUDENTS",
    "TIMM_CONFIG",
    "TIMM_WEIGHTS",
    "TIMM_WEIGHTS_BIN",
    "WHICH",
    "CheckpointError",
    "Family",
    "LoadConfig",
    "Pretrained",
    "UnsafeCheckpointError",
    "architecture",
    "backbone_keys",
    "checkpoint_backbone",
    "classifier_keys",
    "complete_checkpoints",
    "dinov2_keys",
    "dinov3_keys",
    "distilled_backbone",
    "distilled_name",
    "exclude_from_state_dict",
    "export_backbone",
    "export_checkpoint",
    "fsync_dir",
    "import_checkpoint",
    "infer_architecture",
    "latest_checkpoint",
    "load_classifier",
    "load_plain",
    "load_pretrained",
    "load_strict",
    "load_timm",
    "official_dinov2",
    "official_dinov3",
    "official_interp",
    "parse_checkpoint",
    "read_checkpoint",
    "read_pretrained",
    "recorded_interp",
    "resample_to_grid",
    "save_timm",
    "shareable",
    "timm_weights",
    "training_checkpoint",
    "unwrapped",
    "weights_and_spec",
    "write_atomic",
    "write_text_atomic",
]
