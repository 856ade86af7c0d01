"""Which sample ids each process reads from a stream (data.streaming) in one epoch: the check of
its distributed semantics and resume (README § Streaming, docs/performance.md).

    accelerate launch --num_processes 2 tools/stream_ids.py OUT --data.path SHARDS \
        [--epoch 0] [--stop_after K] [--resume_from OUT_OF_A_STOPPED_RUN] [--data.* ...]

Each process writes OUT/ids_<rank>.json: {"ids": [...], "batches": n, "state": its stream
position (what a checkpoint holds)}. --stop_after K stops after K batches (as a kill would, the
position saved); --resume_from DIR restarts each process from DIR's position and reads the
rest of the epoch. Batches of --batch_size images through MAE's view at 32 px.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from accelerate import Accelerator

from ssl_vit.config import DataConfig
from ssl_vit.data import build_stream, single_view


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epoch", type=int, default=0)
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
    start = 0
    if args.resume_from:
        saved = json.loads((args.resume_from / f"ids_{rank}.json").read_text())
        loader.load_state_dict(saved["state"])
        start = saved["batches"]
    loader.set_epoch(args.epoch)
    ids, n = [], start
    for batch in loader.iterate(start):
        ids += batch["index"].tolist()
        n += 1
        if n == args.stop_after:
            break
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"ids": ids, "batches": n, "per_epoch": len(loader), "state": loader.state_dict()}
    (args.out / f"ids_{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
