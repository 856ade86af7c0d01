"""Streams (data.streaming) of shards written by tools/make_shards.py: every image once with its
label and id; samples dealt to processes and loader workers in whole batches, none read twice,
the remainder counted; unreadable images and damaged shards named, counted and made up; a resume
mid-epoch that repeats and loses none (also with another shuffle window); and MAE and DINO
training on WebDataset, Parquet and a Hugging Face repository layout."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
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


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_with_another_shuffle_buffer_goes_on_exactly(shards, caplog, workers):
    """Issue 23 (5): --data.shuffle_buffer 5 -> 3 (allowed by train.resume_changes). Before: the
    saved windows were read as windows of 3, silently repeating and losing samples. Now each
    worker finishes its window at its saved size and takes windows of 3 after it: the epoch
    reads every sample once, and the log says so."""
    first = stream(shards, shuffle_buffer=5, num_workers=workers)
    before = epoch_ids(first, stop=3)
    saved = json.loads(json.dumps(first.state_dict()))
    again = stream(shards, shuffle_buffer=3, num_workers=workers)
    caplog.clear()
    caplog.set_level(logging.INFO)
    again.load_state_dict(saved)
    assert "data.shuffle_buffer: 5 -> 3: each loader worker finishes the window" in caplog.text
    after = epoch_ids(again, start=3)
    assert len(before) + len(after) == N and sorted(before + after) == list(range(N))


@pytest.mark.parametrize("change", [("batch", 3), ("num_workers", 2), ("seed", 1)])
def test_a_resume_with_another_deal_restarts_the_epoch_logged(shards, caplog, change):
    """Issue 23 (5): a position saved under one deal (batch size, loader workers, seed) means
    nothing under another: the epoch's order restarts from its beginning, logged with the
    change (before: a worker count change was, a batch size or seed change went on silently)."""
    key, value = change
    settings = {"batch": 2, "num_workers": 0, "seed": 0}

    def make(batch, num_workers, seed):
        cfg = DataConfig(path=str(shards), streaming=True, num_workers=num_workers)
        cfg.shuffle_buffer = 4
        view = single_view(cfg, 32)
        return build_stream(cfg, view, batch_size=batch, seed=seed, rank=0, processes=1)

    first = make(**settings)
    epoch_ids(first, stop=3)
    saved = json.loads(json.dumps(first.state_dict()))
    moved = settings | {key: value}
    again = make(**moved)
    caplog.clear()
    again.load_state_dict(saved)
    name = {"batch": "train.batch_size", "seed": "train.seed"}.get(key, f"data.{key}")
    assert f"({name}: {settings[key]} -> {value}): epoch 0's order restarts" in caplog.text
    after = epoch_ids(again, start=3)
    assert after == epoch_ids(make(**moved))[: len(after)]  # the new order's start
    same = make(**settings)  # unchanged: no restart
    caplog.clear()
    same.load_state_dict(saved)
    assert "restarts" not in caplog.text


def test_a_resumed_run_with_another_shuffle_buffer_goes_on_exactly(shards, tmp_path):
    """The same through the trainer: --train.resume_changes allow lets data.shuffle_buffer
    change after 3 steps; the stream goes on from its saved windows (the test above: every
    sample once), which the run's log says."""
    run = tmp_path / "run"
    cfg = tiny(run, batch_size=2, epochs=2, max_steps=3)
    cfg.data = DataConfig(path=str(shards), streaming=True, num_workers=0, shuffle_buffer=5)
    fit(cfg)
    cfg = tiny(run, batch_size=2, epochs=2, max_steps=5, resume="auto", resume_changes="allow")
    cfg.data = DataConfig(path=str(shards), streaming=True, num_workers=0, shuffle_buffer=3)
    assert fit(cfg)["steps"] == 5
    log = (run / "train.log").read_text()
    assert "data.shuffle_buffer: 5 -> 3: each loader worker finishes the window it is in" in log
    assert "order restarts" not in log


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
    assert len(ids) == N  # the epoch's 24 batches of 1: no remainder, so a sample repeats
    assert loader.counts == {"skipped": 1, "spares": 0, "repeated": 1} and loader.repeated == 1
    # batches of 5: 20 of the 24 per epoch, 4 left over: the skipped one is made up from them
    for epoch in (0, 1):
        loader = stream(tmp_path / "shards", shuffle_buffer=0, batch=5)
        ids = epoch_ids(loader, epoch)
        assert len(ids) == len(set(ids)) == 20 and 5 not in ids
        assert loader.counts == {"skipped": 1, "spares": 1, "repeated": 0}
        assert loader.unread() == 3


def truncate_tar(shard: Path, samples: int, into_data: bool = False) -> None:
    """Cut a make_shards tar after its first `samples` samples (3 members each), or a few bytes
    into the next one's image data, as a copy that stopped early leaves it."""
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[3 * samples]
    os.truncate(shard, member.offset_data + 100 if into_data else member.offset)


def test_a_truncated_tar_shard_is_named_and_its_lost_samples_count_as_skipped(
    folder, tmp_path, caplog
):
    """Issue 23 (4): a tar cut after 1 of its 3 samples. Before: it gave 1 sample silently, the
    process made up the rest by repeating ("ran dry"). Now the stream names it when built, deals
    its readable sample only, and process 0 counts the 2 lost as skipped images each epoch: 22
    samples, 5 batches of 2 per process, 2 left over, nothing repeated. A cut inside an image's
    bytes reads the same."""
    for into_data in (False, True):
        root = tmp_path / f"cut{into_data}"
        make_shards.main([str(folder), str(root), "--max_count", "3"])
        shard = sorted(root.glob("train-*.tar"))[2]
        with tarfile.open(shard) as tar:  # its samples' ids, in order
            members = [m for m in tar.getmembers() if m.name.endswith(".json")]
            in_shard = [json.loads(tar.extractfile(m).read())["id"] for m in members]
        truncate_tar(shard, 1, into_data)
        caplog.clear()
        loaders = [stream(root, rank=r, processes=2, shuffle_buffer=4) for r in (0, 1)]
        assert f"{shard}: truncated or damaged shard" in caplog.text
        assert "1 of its 3 samples are readable" in caplog.text
        for epoch in (0, 1):
            ids, skipped = [], []
            for loader in loaders:
                loader.set_epoch(epoch)
                for batch in loader.iterate(0):
                    ids += batch["index"].tolist()
                    skipped += batch["skipped"]
            assert [len(loader) for loader in loaders] == [5, 5]
            assert len(ids) == len(set(ids)) == 20  # of the 22 readable: 0 repeated
            assert skipped == [f"{shard}: damaged shard, 2 of its 3 samples unreadable"] * 2
            assert sum(loader.unread() for loader in loaders) == 2
            assert [loader.counts["repeated"] for loader in loaders] == [0, 0]
            assert not set(ids) & set(in_shard[1:])  # the lost two


def test_a_shard_that_fails_while_read_names_itself_and_its_samples_are_made_up(folder, tmp_path):
    """A shard whose index says 4 samples while the tar holds 3 (it ends whole: nothing to see
    when the stream is built): the sample it lacks is skipped with the shard named, and made up
    from the remainder, else (batches of 5 over 25: no remainder) by a repeat, counted."""
    root = tmp_path / "short"
    make_shards.main([str(folder), str(root), "--max_count", "3"])
    index = json.loads((root / "_index.json").read_text())
    name = sorted(index["splits"]["train"]["files"])[4]
    index["splits"]["train"]["files"][name] = 4
    (root / "_index.json").write_text(json.dumps(index))
    loader = stream(root, batch=5, shuffle_buffer=4)
    ids, skipped = [], []
    for batch in loader.iterate(0):
        ids += batch["index"].tolist()
        skipped += batch["skipped"]
    why = "its samples from #3 on are unreadable (it has no more samples)"
    assert skipped == [f"{root / name}: damaged shard, {why}"]
    assert len(ids) == 25 and set(ids) == set(range(N))  # all 24, one of them twice
    assert loader.counts == {"skipped": 1, "spares": 0, "repeated": 1} and loader.unread() == 0
    # in training: the run's metrics and each epoch's summary in its log
    cfg = tiny(tmp_path / "run", batch_size=5, epochs=2)
    cfg.data = DataConfig(path=str(root), streaming=True, num_workers=0, shuffle_buffer=4)
    result = fit(cfg)
    assert (result["steps"], result["skipped_images"], result["repeated_samples"]) == (10, 2, 2)
    log = (tmp_path / "run" / "train.log").read_text()
    summary = "5 batches; 1 samples skipped (unreadable), 0 made up from the epoch's remainder, 1 "
    summary += "repeated; 0 of its share of the remainder unread"
    assert (
        f"stream epoch 0, process 0: {summary}" in log and f"epoch 1, process 0: {summary}" in log
    )


def test_a_parquet_shard_that_is_not_parquet_is_an_error_naming_it(folder, tmp_path):
    """Before: an ArrowInvalid traceback from inside a loader worker, once a worker reached it."""
    root = tmp_path / "pq"
    make_shards.main([str(folder), str(root), "--max_count", "3", "--format", "parquet"])
    shard = sorted(root.glob("train-*.parquet"))[3]
    data = bytearray(shard.read_bytes())
    data[:4] = data[-4:] = b"XXXX"  # its magic bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {shard.name} is not a readable Parquet file"):
        stream(root)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_more_loader_workers_than_shards_share_them(shards):
    """Samples, not shards, are dealt: 5 workers on a process's 12 samples (4 shards' worth)
    each read a run of whole batches, 2 + 1 + 1 + 1 + 1 batches of 2."""
    per_rank = [epoch_ids(stream(shards, rank=r, processes=2, num_workers=5)) for r in (0, 1)]
    assert [len(ids) for ids in per_rank] == [12, 12]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(N))


def test_batches_that_do_not_divide_a_workers_share_neither_repeat_nor_lose(shards):
    """Issue 23 (4): 2 processes x 2 workers, batches of 4: a worker's 6 samples of 2 whole
    shards are not whole batches. Before, each worker dropped 2 and each process made up its
    third batch from its epoch's start (4 repeated, 4 never read, per process). Now every
    sample is read once; with batches of 5 (2 per process), 4 samples are left over, counted,
    and another epoch leaves others over."""
    for batch, left in ((4, 0), (5, 4)):
        loaders = [stream(shards, rank=r, processes=2, num_workers=2, batch=batch) for r in (0, 1)]
        missing = []
        for epoch in (0, 1):
            ids = [i for loader in loaders for i in epoch_ids(loader, epoch)]
            assert len(ids) == len(set(ids)) == N - left  # 0 repeated
            assert [len(loader) for loader in loaders] == [(N - left) // batch // 2] * 2
            assert sum(loader.unread() for loader in loaders) == left  # the remainder, counted
            assert all(
                loader.counts == {"skipped": 0, "spares": 0, "repeated": 0} for loader in loaders
            )
            missing.append(set(range(N)) - set(ids))
        assert len(missing[0]) == left and (not left or missing[0] != missing[1])


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
        assert result["skipped_images"] == result["repeated_samples"] == 0
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


def launch(*args: str) -> list[dict]:
    """Run tools/stream_ids.py on 2 processes (gloo); its per-epoch summaries."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", "2", "--num_machines", "1", "--main_process_port", "0"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(ROOT / "tools" / "stream_ids.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


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


def test_two_launched_processes_deal_whole_batches_and_count_a_damaged_shard(folder, tmp_path):
    """Issue 23 (4) under accelerate launch: 2 processes x 2 loader workers, batches of 4 (a
    worker's 6 samples are not whole batches; before: per epoch 8 repeated, 8 never read):
    every epoch reads the 24 once. With a shard cut after 1 of its 3 samples: 2 batches per
    process, nothing repeated, its 2 lost counted as skipped and named, the 6 left over counted:
    no sample unaccounted for."""
    shards = tmp_path / "shards"
    make_shards.main([str(folder), str(shards), "--max_count", "3"])
    data = ["--data.path", str(shards), "--data.streaming", "true", "--data.num_workers", "2"]
    data += ["--data.shuffle_buffer", "5", "--batch_size", "4", "--epochs", "2"]
    epochs = launch(str(tmp_path / "whole"), *data)
    assert [e["epoch"] for e in epochs] == [0, 1]
    for epoch in epochs:
        assert epoch["batches"] == [3, 3] and epoch["read"] == epoch["distinct"] == N
        assert (epoch["repeated"], epoch["missing"], epoch["unaccounted"]) == (0, 0, 0)
    shard = sorted(shards.glob("train-*.tar"))[5]
    truncate_tar(shard, 1)
    epochs = launch(str(tmp_path / "cut"), *data)
    assert [e["epoch"] for e in epochs] == [0, 1]
    for epoch in epochs:
        assert epoch["batches"] == [2, 2] and epoch["read"] == epoch["distinct"] == 16
        counts = [epoch[k] for k in ("repeated", "missing", "skipped", "unread", "unaccounted")]
        assert counts == [0, 8, 2, 6, 0]
        assert epoch["skipped_where"] == [f"{shard}: damaged shard, 2 of its 3 samples unreadable"]
