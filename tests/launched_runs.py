"""One process of a launch that runs several trainings in a row: `accelerate launch
tests/launched_runs.py RUNS.json [--fsdp]`, RUNS.json a list of `ssl-vit train` argument lists
(or of another command's, named first: ["segfinetune", "--checkpoint", ...]). One launch serves
many runs, so the multi-process tests pay the launcher's start-up once. Exits with the first
non-zero status."""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from ssl_vit.cli import main


def fsdp_on_cpu() -> None:
    """Let Accelerate's FSDP path run on CPU processes. Accelerate turns ACCELERATE_USE_FSDP into
    FSDP only for GPU-like process groups (a GPU-less launch is MULTI_CPU, which it replicates
    with DDP), while torch's fully_shard itself runs on CPU over gloo; so this process's gloo
    group is declared GPU-like, and the device pinned to the CPU."""
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    dist.init_process_group("gloo")
    PartialState._prepare_backend = lambda *_, **__: ("gloo", DistributedType.MULTI_GPU)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        runs = json.load(f)
    if "--fsdp" in sys.argv:
        fsdp_on_cpu()
    end = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda *_: None  # each run's end: the next one needs it
    for args in runs:
        if status := main(args if args[0][0] != "-" else ["train", *args]):
            sys.exit(status)
    end(PartialState())
