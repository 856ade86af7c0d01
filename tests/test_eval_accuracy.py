"""Top-k accuracy over an evaluation loader, and the loader itself (order, eval view, sharding)."""

import contextlib

import pytest
import torch
from accelerate import Accelerator

from ssl_vit.config import Config, DataConfig, ModelConfig
from ssl_vit.data import DataError
from ssl_vit.eval.accuracy import classification_metrics, eval_loader
from ssl_vit.methods.mae import MAEConfig


class OneProcess:
    """The accelerator calls classification_metrics makes, for a single process."""

    is_main_process = True

    def autocast(self):
        return contextlib.nullcontext()

    def gather_for_metrics(self, x):
        return x


def test_top1_top5_on_hand_built_logits():
    # 3 classes ranked per image; labels hit rank 1, rank 2, rank 6 (miss), rank 1
    logits = torch.tensor([
        [9.0, 1, 2, 3, 4, 5], [1.0, 9, 8, 3, 4, 5], [9.0, 8, 7, 6, 5, 0], [0.0, 0, 0, 0, 0, 9],
    ])  # fmt: skip
    labels = torch.tensor([0, 2, 5, 5])
    loader = [
        {"images": logits[:2], "labels": labels[:2]},
        {"images": logits[2:], "labels": labels[2:]},
    ]
    m = classification_metrics(lambda x: x, loader, OneProcess())
    assert m == {"top1": 50.0, "top5": 75.0}
    last3 = [{"images": logits[1:], "labels": labels[1:]}]  # top-1: 1 of 3, top-5: 2 of 3
    thirds = classification_metrics(lambda x: x, last3, OneProcess())
    assert thirds == {"top1": 33.333, "top5": 66.667}  # before: 33.333333333333336
    with pytest.raises(DataError, match="labeled"):
        classification_metrics(
            lambda x: x, [{"images": logits, "labels": -labels - 1}], OneProcess()
        )


def test_eval_loader_is_ordered_center_cropped_and_complete():
    cfg = Config(
        model=ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8),
        data=DataConfig(synthetic_size=200, num_workers=0),
        method=MAEConfig(),
    )
    cfg.train.batch_size = 8
    loader = eval_loader(cfg, "val", Accelerator(cpu=True))
    batches = list(loader)
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == list(range(20))  # synthetic val: max(200 // 10, 10) images, in order
    assert batches[0]["images"].shape == (8, 3, 32, 32)
    again = next(iter(loader))["images"]
    assert torch.equal(again, batches[0]["images"])  # deterministic: no random augmentation
