"""Which sample ids each process reads from a stream (data.streaming) in an epoch: the check of
its distributed semantics and resume (README § Streaming, docs/performance.md).

    accelerate launch --multi_gpu --num_processes 2 tools/stream_ids.py OUT --data.path SHARDS \
        [--epoch 0] [--epochs 1] [--stop_after K] [--resume_from OUT_OF_A_STOPPED_RUN] \
        [--batch_size 2] [--data.* ...]

Each process writes OUT/ids_<rank>.json: {"ids": [...], "batches": n, "state": its stream
position (what a checkpoint holds), "epochs": [per epoch: ids, batches, skipped, counts, unread]}.
--stop_after K stops after K batches of the first epoch (as a kill would, the position saved);
--resume_from DIR restarts each process from DIR's position and reads the rest of that epoch.
Batches of --batch_size images through MAE's view at 32 px.

Process 0 then prints one JSON line per epoch over all processes (and the stopped run's part when
resuming): the dataset's samples (those a damaged shard lost included), ids read, distinct,
repeated (read - distinct), missing (samples - distinct), skipped (reported unreadable), unread
(the epoch's remainder the loaders left), and unaccounted (missing - skipped - unread: samples
lost silently; 0 is the guarantee; null for an epoch stopped by --stop_after).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ssl_vit.config import DataConfig
from ssl_vit.data import build_stream, single_view


def summary(records: list[dict[str, Any]], samples: int) -> list[dict[str, Any]]:
    """Per epoch, over the processes' records (each {"epochs": [...]}): the counts above."""
    out = []
    for k, first in enumerate(records[0]["epochs"]):
        parts = [r["epochs"][k] for r in records]
        ids = [i for p in parts for i in p["ids"]]
        skipped = sum(p["counts"]["skipped"] for p in parts)
        unread = sum(p["unread"] or 0 for p in parts)
        missing = samples - len(set(ids))
        whole = all(p["batches"] == r["per_epoch"] for p, r in zip(parts, records, strict=True))
        out.append(
            {
                "epoch": first["epoch"],
                "samples": samples,
                "batches": [p["batches"] for p in parts],
                "read": len(ids),
                "distinct": len(set(ids)),
                "repeated": len(ids) - len(set(ids)),
                "missing": missing,
                "skipped": skipped,
                "unread": unread,
                "unaccounted": missing - skipped - unread if whole else None,  # a stopped epoch
                "skipped_where": sorted({w for p in parts for w in p["skipped"]}),
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1, help="epochs from --epoch on")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop_after", type=int, default=0, help="batches (0: the whole epoch)")
    parser.add_argument("--resume_from", type=Path, default=None)
    for f in fields(DataConfig):
        name = f.type if isinstance(f.type, str) else f.type.__name__
        if name in ("str", "int", "bool"):
            kind = {"int": int, "bool": lambda s: s.lower() == "true"}.get(name, str)
            parser.add_argument(f"--data.{f.name}", dest=f.name, type=kind, default=None)
    args = parser.parse_args(argv)
    data = DataConfig(num_workers=0)
    for f in fields(DataConfig):
        if getattr(args, f.name, None) is not None:
            setattr(data, f.name, getattr(args, f.name))
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    loader = build_stream(
        data,
        single_view(data, 32),
        batch_size=args.batch_size,
        seed=args.seed,
        rank=rank,
        processes=acc.num_processes,
    )
    start, before = 0, None
    if args.resume_from:
        before = json.loads((args.resume_from / f"ids_{rank}.json").read_text())
        loader.load_state_dict(before["state"])
        start = before["batches"]
    epochs = []
    for epoch in range(args.epoch, args.epoch + args.epochs):
        loader.set_epoch(epoch)
        ids, skipped, n = [], [], start
        for batch in loader.iterate(start):
            ids += batch["index"].tolist()
            skipped += batch["skipped"]
            n += 1
            if n == args.stop_after:
                break
        read = ids  # by this run
        if before is not None and epoch == args.epoch:  # with the stopped run's part
            ids, skipped = before["ids"] + ids, before["epochs"][0]["skipped"] + skipped
        counts, unread = dict(loader.counts), loader.unread()
        epochs.append({"epoch": epoch, "ids": ids, "batches": n, "skipped": skipped})
        epochs[-1] |= {"counts": counts, "unread": unread}
        start = 0
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"ids": read, "batches": n, "per_epoch": len(loader), "epochs": epochs}
    record["state"] = loader.state_dict()
    (args.out / f"ids_{rank}.json").write_text(json.dumps(record))
    acc.wait_for_everyone()
    if rank == 0:
        files = [args.out / f"ids_{r}.json" for r in range(acc.num_processes)]
        records = [json.loads(f.read_text()) for f in files]
        samples = len(loader.dataset) + len(loader.lost)
        for line in summary(records, samples):
            print(json.dumps(line), flush=True)
    acc.end_training()


if __name__ == "__main__":
    main()
