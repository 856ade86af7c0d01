"""Streams (data.streaming) of shards written by tools/make_shards.py: every image once with its
label and id, shards split across processes and loader workers with no sample read twice, a
resume mid-epoch that repeats and loses none, and MAE and DINO
training on WebDataset, Parquet and a Hugging Face repository layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import make_shards
import pytest
import torch
from conftest import ROOT, params, tiny, train_until_killed
from write_images import write_image_folder

from ssl_vit.config import ConfigError, DataConfig
from ssl_vit.data import DataError, build_stream, single_view
from ssl_vit.data.datasets import _image_folder
from ssl_vit.train.loop import fit

N, CLASSES = 24, ("a", "b", "c")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """24 JPEGs of 32 px in three class folders of 8."""
    root = tmp_path_factory.mktemp("images")
    for c in CLASSES:
        write_image_folder(root / c, N // len(CLASSES), 32)
    return root


@pytest.fixture(scope="module", params=["webdataset", "parquet"])
def shards(request, folder, tmp_path_factory) -> Path:
    """`folder` as 8 shards of 3 images."""
    out = tmp_path_factory.mktemp(request.param)
    make_shards.main([str(folder), str(out), "--format", request.param, "--max_count", "3"])
    return out


def stream(path: Path, rank=0, processes=1, batch=2, **data):
    cfg = DataConfig(path=str(path), streaming=True, num_workers=0, shuffle_buffer=4)
    for k, v in data.items():
        setattr(cfg, k, v)
    view = single_view(cfg, 32)
    return build_stream(cfg, view, batch_size=batch, seed=0, rank=rank, processes=processes)


def epoch_ids(loader, epoch=0, start=0, stop=None) -> list[int]:
    loader.set_epoch(epoch)
    ids = []
    for k, batch in enumerate(loader.iterate(start), start=start):
        ids += batch["index"].tolist()
        if k + 1 == stop:
            break
    return ids


def test_make_shards_stores_every_image_once_with_label_and_id(folder, shards, tmp_path):
    index = json.loads((shards / "_index.json").read_text())
    files = index["splits"]["train"]["files"]
    assert list(files.values()) == [3] * 8 and sorted(shards.glob("train-*-of-00008.*"))
    assert index["splits"]["train"]["classes"] == list(CLASSES)
    source = _image_folder(folder)
    loader = stream(shards, shuffle_buffer=0, batch=1)
    seen = {}
    for batch in loader.iterate(0):
        seen[int(batch["index"])] = int(batch["labels"])
    assert seen == {i: source.labels[i] for i in range(N)}  # ids 0..23, each with its label

    # a byte budget: 3 images of ~1 KB fit in 3.5 KB, so shards of 3 (the last shorter)
    sizes = sorted(os.path.getsize(f) for f in folder.rglob("*.jpg"))
    budget = str(sum(sizes[-3:]) + 1)
    out = make_shards.main([str(folder), str(tmp_path / "bytes"), "--max_size", budget])
    assert sum(out.values()) == N and all(1 <= n <= 3 for n in out.values()) and len(out) >= 8


def test_processes_read_disjoint_shards_that_cover_the_dataset(shards):
    for workers in (0, 2):
        per_rank = [
            epoch_ids(stream(shards, rank=r, processes=2, num_workers=workers)) for r in (0, 1)
        ]
        a, b = map(set, per_rank)
        assert len(per_rank[0]) == len(a) == 12 and len(per_rank[1]) == len(b) == 12
        assert not a & b and a | b == set(range(N))
    # 3 processes: 8 shards do not divide, so each reads every 3rd sample: 8 each, disjoint
    per_rank = [set(epoch_ids(stream(shards, rank=r, processes=3))) for r in range(3)]
    assert sum(map(len, per_rank)) == N and set().union(*per_rank) == set(range(N))
    # another epoch: another order, the same samples
    loader = stream(shards)
    first, second = epoch_ids(loader, 0), epoch_ids(loader, 1)
    assert first != second and sorted(first) == sorted(second) == list(range(N))


@pytest.mark.parametrize("buffer,workers", [(0, 0), (5, 0), (0, 2), (5, 2)])
def test_resume_mid_epoch_repeats_none_and_loses_none(shards, buffer, workers):
    k = 3
    whole = epoch_ids(stream(shards, shuffle_buffer=buffer, num_workers=workers))
    assert sorted(whole) == list(range(N))
    first = stream(shards, shuffle_buffer=buffer, num_workers=workers)
    before = epoch_ids(first, stop=k)
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint holds it
    again = stream(shards, shuffle_buffer=buffer, num_workers=workers)
    again.load_state_dict(saved)
    after = epoch_ids(again, start=k)
    repeated = len(before) + len(after) - len(set(before + after))
    missing = N - len(set(before + after))
    assert len(before) == 2 * k and len(before) + len(after) == len(whole)  # a whole epoch
    assert missing == repeated == 0
    if workers == 0:  # the same epoch exactly
        assert before + after == whole
    else:  # each worker continues its own sequence; the loader restarts at worker 0
        assert sorted(before + after) == sorted(whole)
    if buffer:  # shuffled within windows of 5: not the order of the shards
        assert whole != epoch_ids(stream(shards, shuffle_buffer=0, num_workers=workers))


def test_an_unreadable_image_is_skipped_and_named(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    victim = sorted(bad.rglob("*.jpg"))[5]
    victim.write_bytes(b"not a jpeg")
    make_shards.main([str(bad), str(tmp_path / "shards"), "--max_count", "3"])
    loader = stream(tmp_path / "shards", shuffle_buffer=0, batch=1)
    skipped, ids = [], []
    for batch in loader.iterate(0):
        skipped += batch["skipped"]
        ids += batch["index"].tolist()
    assert len(skipped) == 1 and "000000005" in skipped[0]
    assert set(ids) == set(range(N)) - {5}
    assert len(ids) == N  # the epoch's 24 batches of 1, made up by the stream's first sample


def test_too_many_workers_for_the_shards_is_refused(shards):
    with pytest.raises(DataError, match="more loader workers than the 4 shards"):
        stream(shards, processes=2, num_workers=5)


def hub_layout(shards: Path, tmp_path: Path) -> Path:
    """The shards as a Hugging Face dataset repository: data/train-*, README.md, no index."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for f in shards.glob("train-*"):
        shutil.copy(f, repo / "data" / f.name)
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    return repo


def test_decode_on_device_streams_each_images_own_bytes(folder, shards):
    files = _image_folder(folder).files
    batch = next(stream(shards, decode_on_device=True, batch=4).iterate(0))
    for k, i in enumerate(batch["index"].tolist()):
        assert bytes(batch["encoded"][k].numpy()) == Path(files[i]).read_bytes()


def test_mae_trains_on_a_shard_folder_and_dino_on_a_hub_repository_layout(shards, tmp_path):
    hub = hub_layout(shards, tmp_path)
    for method, path, device in (("mae", shards, False), ("dino", hub, False), ("dino", hub, True)):
        run = tmp_path / f"{method}{device}"
        cfg = tiny(run, method, batch_size=4, epochs=2)
        cfg.data = DataConfig(path=str(path), streaming=True, num_workers=0, shuffle_buffer=4)
        cfg.data.decode_on_device = device  # DINO's multi-crop decoded and drawn batched
        result = fit(cfg)
        assert result["steps"] == 12  # 6 batches of 4 per epoch of 24
        assert torch.isfinite(torch.tensor(result["final_loss"]))
        state = json.loads((run / "checkpoints" / "step_0000012" / "stream_0.json").read_text())
        assert state["epoch"] == 1 and state["num_workers"] == 0


def test_repeated_augmentation_on_a_stream_is_refused(folder, tmp_path):
    make_shards.main([str(folder), str(tmp_path / "shards"), "--max_count", "3"])
    cfg = tiny(tmp_path / "deit", "deit", batch_size=4, epochs=1)
    cfg.data = DataConfig(path=str(tmp_path / "shards"), streaming=True, num_workers=0)
    cfg.method.num_classes = 0  # the index's 3
    with pytest.raises(ConfigError, match="method.repeated_aug 1"):
        fit(cfg)
    cfg.method.repeated_aug = 1
    assert fit(cfg)["steps"] == 6


def test_resume_after_sigkill_is_bit_identical_with_a_shuffle_window(folder, tmp_path):
    """A resumed stream continues exactly, mid-window, so the weights equal an uninterrupted
    run's (a repeated or lost sample would change them); another worker count is refused.
    WebDataset shards (Parquet resumes through the same position: the test above)."""
    shards = tmp_path / "shards"
    make_shards.main([str(folder), str(shards), "--max_count", "3"])
    n, schedule = 4, dict(epochs=4, max_steps=10, batch_size=2, save_every_steps=4, keep_last=10)
    data = dict(streaming=True, num_workers=0, shuffle_buffer=3)  # killed after 8 samples

    def cfg(run, **kw):
        c = tiny(run, **schedule | kw)
        c.data = DataConfig(path=str(shards), **data)
        return c

    fit(cfg(tmp_path / "straight"))
    killed = tmp_path / "killed"
    train_until_killed(cfg(killed), n)  # mid-epoch: 12 batches per epoch
    moved = cfg(killed, resume="auto")
    moved.data.num_workers = 1
    with pytest.raises(ConfigError, match=r"data.num_workers: 0 -> 1"):
        fit(moved)
    fit(cfg(killed, resume="auto"))
    a, b = params(tmp_path / "straight", 10), params(killed, 10)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed parameters differ"


def launch(*args: str) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", "2", "--num_machines", "1", "--main_process_port", "0"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(ROOT / "tools" / "stream_ids.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_launched_processes_read_disjoint_ids_and_resume(folder, tmp_path):
    """Two processes, 2 loader workers each, windows of 5: each stopped after 2 batches (its
    position saved, as a kill leaves it) and resumed; per process the two parts make 12 distinct
    ids, the processes' are disjoint and cover the 24."""
    shards = tmp_path / "shards"  # WebDataset: Parquet's process split is the same code
    make_shards.main([str(folder), str(shards), "--max_count", "3"])
    data = ["--data.path", str(shards), "--data.streaming", "true", "--data.num_workers", "2"]
    data += ["--data.shuffle_buffer", "5"]
    stopped = tmp_path / "stopped"
    launch(str(stopped), *data, "--stop_after", "2")
    launch(str(tmp_path / "resumed"), *data, "--resume_from", str(stopped))
    ids = []
    for r in (0, 1):
        part = json.loads((stopped / f"ids_{r}.json").read_text())["ids"]
        assert len(part) == 4  # 2 batches of 2
        ids.append(part + json.loads((tmp_path / "resumed" / f"ids_{r}.json").read_text())["ids"])
    assert len(ids[0]) == len(set(ids[0])) == 12 and len(ids[1]) == len(set(ids[1])) == 12
    assert not set(ids[0]) & set(ids[1]) and set(ids[0]) | set(ids[1]) == set(range(N))
