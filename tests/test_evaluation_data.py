"""Evaluations that cannot lie: the evaluation data is checked before any step or feature (a
held-out split exists apart from the training images, is labeled, has the training split's
classes); `validation` / `test` splits are recognised; the training split is scored only when
named, and results then say so; a checkpoint is saved before an evaluation; the evaluation's
epoch, the img/s around it and a resumed run's first loss are the run's own."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import metrics, tiny
from torchvision.transforms.functional import to_pil_image

from ssl_vit.backbone import Backbone
from ssl_vit.cli import main
from ssl_vit.data import DataError, SyntheticImages
from ssl_vit.train import run as run_module
from ssl_vit.train.loop import fit
from ssl_vit.weights import complete_checkpoints, export_backbone

KNN = ["--knn.k", "5", "--knn.batch_size", "16", "--data.num_workers", "0"]


def image_folder(root: Path, split: str, n: int, classes: int = 4, labeled: bool = True) -> Path:
    """n synthetic 32 px PNGs of the first `classes` classes, in class sub-folders (or flat)."""
    images = SyntheticImages(4 * n, 10, 32, "val" if split != "train" else "train")
    written = 0
    for i in range(len(images)):
        image, label = images[i]
        if label >= classes or written == n:
            continue
        folder = root / f"c{label}" if labeled else root
        folder.mkdir(parents=True, exist_ok=True)
        to_pil_image(image).save(folder / f"{split}{i:04d}.png")
        written += 1
    return root


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("knn") / "run"
    export_backbone(Backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1), run)
    return run


def knn(capsys, checkpoint: Path, *args: str) -> tuple[int, dict | str]:
    code = main(["knn", "--checkpoint", str(checkpoint), *KNN, *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else captured.err


def test_knn_never_scores_training_images_as_held_out(tmp_path, backbone_dir, capsys):
    """A class folder with no val/ (before: the training images against themselves, 71 %), or
    only train/<class>/ (before: the root read as one class 'train', 10.6 %): an error naming the
    missing split; the training images are scored when named, and the result says so."""
    flat = image_folder(tmp_path / "flat", "train", 24)
    code, err = knn(capsys, backbone_dir, "--data.path", str(flat))
    assert code == 2 and "no held-out split (val, validation, test)" in err
    assert "--data.val_split train" in err and "k-NN bank" not in err  # before any feature
    code, result = knn(capsys, backbone_dir, "--data.path", str(flat), "--data.val_split", "train")
    assert code == 0 and (result["eval_split"], result["held_out"]) == ("train", False)

    only_train = image_folder(tmp_path / "only" / "train", "train", 24).parent
    code, err = knn(capsys, backbone_dir, "--data.path", str(only_train))
    assert code == 2 and "its splits: ['train']" in err
    code, err = knn(capsys, backbone_dir, "--data.path", str(only_train), "--data.val_split", "val")
    assert code == 2 and "no split 'val' (data.val_split)" in err

    image_folder(only_train / "val", "val", 12, classes=3)  # a class short: labels by name
    code, result = knn(capsys, backbone_dir, "--data.path", str(only_train))
    assert code == 0 and (result["eval_split"], result["held_out"]) == ("val", True)


def test_the_bank_is_never_its_own_query_unless_named(tmp_path, backbone_dir, capsys):
    """`--data.split val` with val_split auto (before: `val` scored against itself, 100 %, rc 0):
    refused naming the keys and how to ask for it, before any feature; named, it runs and says
    held_out false. Data with another evaluation split takes that one."""
    synthetic = ["--data.split", "val", "--data.synthetic_size", "40"]
    code, err = knn(capsys, backbone_dir, *synthetic)
    assert code == 2 and "data.val_split auto: the only evaluation split of synthetic, 'val'" in err
    assert "the training split (data.split, the k-NN bank)" in err and "k-NN bank:" not in err
    assert "ask for this one by name: --data.val_split val (results then say held_out false)" in err
    code, result = knn(capsys, backbone_dir, *synthetic, "--data.val_split", "val")
    assert code == 0 and (result["eval_split"], result["held_out"]) == ("val", False)

    for split in ("train", "val", "test"):
        image_folder(tmp_path / "data" / split, split, 12)
    code, result = knn(capsys, backbone_dir, "--data.path", str(tmp_path / "data"), "--data.split",
                       "val")  # fmt: skip
    assert code == 0 and (result["eval_split"], result["held_out"]) == ("test", True)


def test_evaluations_during_training_name_their_split_everywhere(tmp_path):
    """Each evaluation's metrics.jsonl row, log line and tracker tags name its split and whether
    it is held out (before: {"step": 4, "epoch": 1.0, "knn_top1": ...}, tag eval/knn_top1, the
    same for a run evaluating its training split)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for split, held_out in (("val", True), ("train", False)):
        run = tmp_path / split
        cfg = tiny(run, epochs=2, warmup_epochs=0, eval_every_epochs=1)
        cfg.data.val_split = split if split == "train" else "auto"
        result = fit(cfg)
        rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "knn_top1" in r and "final" not in r]
        assert [(r["step"], r["eval_split"], r["held_out"]) for r in evals] == [
            (4, split, held_out), (8, split, held_out)
        ]  # fmt: skip
        assert (result["eval_split"], result["held_out"]) == (split, held_out)
        log = (run / "train.log").read_text()
        assert f"'eval_split': '{split}', 'held_out': {held_out}}}" in log
        events = EventAccumulator(str(next((run / "tb").rglob("events.out.tfevents.*")).parent))
        events.Reload()
        evals = sorted(t for t in events.Tags()["scalars"] if t.startswith("eval"))
        assert evals == [f"eval/{split}/{k}" for k in ("epoch", "held_out", "knn_top1", "knn_top5")]
        assert [e.value for e in events.Scalars(f"eval/{split}/held_out")] == [held_out] * 2


def test_hugging_face_validation_and_test_splits_are_recognised(tmp_path, backbone_dir, capsys):
    datasets = pytest.importorskip("datasets")

    def split(name: str, n: int):
        images = SyntheticImages(n, 10, 32, "train" if name == "train" else "val")
        rows = [images[i] for i in range(n)]
        ds = datasets.Dataset.from_dict(
            {"image": [to_pil_image(x) for x, _ in rows], "label": [y for _, y in rows]}
        )
        return ds.cast_column("label", datasets.ClassLabel(num_classes=10))

    for held, want in (({"validation", "test"}, "validation"), ({"test"}, "test")):
        path = tmp_path / want
        datasets.DatasetDict(
            {"train": split("train", 40)} | {s: split(s, 20) for s in held}
        ).save_to_disk(str(path))
        code, result = knn(capsys, backbone_dir, "--data.path", str(path))
        assert code == 0 and result["eval_split"] == want and result["held_out"]
    single = tmp_path / "single"
    split("train", 20).save_to_disk(str(single))
    code, err = knn(capsys, backbone_dir, "--data.path", str(single))
    assert code == 2 and "no held-out split" in err


def test_unlabeled_evaluation_data_fails_before_the_first_step(tmp_path):
    """DINO on an unlabeled folder with evaluations (before: it died at its first evaluation,
    hours in, that epoch's checkpoint lost)."""
    data = image_folder(tmp_path / "photos" / "train", "train", 16, labeled=False).parent
    image_folder(data / "val", "val", 8)
    cfg = tiny(tmp_path / "run", "dino", eval_every_epochs=1)
    cfg.data.path = str(data)
    with pytest.raises(
        DataError, match=r"needs labels: the training split.*train.eval_every_epochs 0"
    ):
        fit(cfg)
    assert not (tmp_path / "run").exists()  # before the run directory: nothing to clean up


def test_checkpoint_is_saved_before_the_evaluation(tmp_path, monkeypatch):
    def failing(*args):
        raise DataError("evaluation failed")

    monkeypatch.setattr(run_module, "evaluate", failing)
    cfg = tiny(tmp_path / "run", eval_every_epochs=1, save_every_epochs=1)
    with pytest.raises(DataError, match="evaluation failed"):
        fit(cfg)
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step_0000004"]


def test_evaluation_epoch_and_img_per_s_leave_the_evaluation_out(tmp_path, monkeypatch):
    evaluate = run_module.evaluate

    def slow(*args):
        time.sleep(3)
        return evaluate(*args)

    monkeypatch.setattr(run_module, "evaluate", slow)
    result = fit(tiny(tmp_path / "run", epochs=2, eval_every_epochs=1))
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in rows if "knn_top1" in r] == [(4, 1.0), (8, 2.0)]
    seconds = {r["step"]: 8 / r["img_per_s"] for r in metrics(tmp_path / "run")}  # 8 images
    # the window after the evaluation (step 5) takes a step's time, not the 3 s evaluation's: no
    # longer than the slowest other step's window plus half of it (a loaded machine's spread)
    assert seconds[5] < max(seconds[k] for k in (2, 3, 6, 7)) + 1.5
    assert (result["eval_split"], result["held_out"]) == ("val", True)


def test_a_resumed_run_reports_the_runs_first_loss(tmp_path):
    first = fit(tiny(tmp_path / "run", max_steps=3, save_every_steps=3))
    resumed = fit(tiny(tmp_path / "run", resume="auto"))
    assert resumed["steps"] == 16 and resumed["first_loss"] == first["first_loss"]


def test_an_unreachable_hub_is_one_line_at_once_and_leaves_no_run_directory(tmp_path, monkeypatch):
    """hf:NAME with the Hub out of reach (before: most of a minute of retries, then a 70-line
    ConnectionError, and an empty run directory left behind)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # refused at once, locally
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    cfg = tiny(tmp_path / "run")
    cfg.data.path = "hf:someone/photos"
    start = time.monotonic()
    with pytest.raises(DataError, match=r"^hf:someone/photos: cannot load it from the Hugging"):
        fit(cfg)
    assert time.monotonic() - start < 15
    assert not (tmp_path / "run").exists()
