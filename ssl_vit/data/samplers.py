"""Sample orders for Accelerate's batch sharding: repeated augmentation (Hoffer et al. 2020; DeiT's
`RASampler`), and a crop-size choice per training step (DINOv3's high-resolution adaptation).

DeiT's RASampler repeats every index of a shuffled epoch `repeats` times ([a, a, a, b, b, b, ...])
and deals that list round-robin to the processes (`rep[rank::P]`), each keeping its first
len(dataset) / P indices: about len(dataset) / repeats distinct images per epoch, each in
`repeats` differently augmented copies that land on different processes where P > 1.

Accelerate does not shard a sampler: `accelerator.prepare` keeps one global order and hands whole
batches round-robin (process r gets batches r, r + P, ...). So this sampler yields the global order
that, dealt out that way, gives each process exactly RASampler's stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of range(n) determined by (seed, epoch): an epoch's shuffled order."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(n, generator=g)


class RepeatedAugSampler(Sampler[int]):
    """The global sample order of an epoch of repeated augmentation, for `num_processes` processes
    that each take whole batches of `batch_size` in turn.

    An epoch has len(dataset) samples, or with `trim` > 0 DeiT's RASampler count: floor(len /
    trim) x trim (256 in DeiT), rounded down to a multiple of the processes. With drop_last
    batching, the samples taken are a prefix of the repeated list, so every drawn index appears
    `repeats` times (but at most one, cut at the end), its copies on processes q % P for the
    copies' positions q. Deterministic in (seed, epoch): call `set_epoch` before each epoch.
    """

    def __init__(
        self,
        dataset_len: int,
        num_processes: int,
        batch_size: int,
        repeats: int = 3,
        seed: int = 0,
        trim: int = 0,
    ):
        self.n, self.p, self.b, self.repeats = dataset_len, num_processes, batch_size, repeats
        self.seed, self.epoch = seed, 0
        self.length = dataset_len
        if trim:  # RASampler: num_selected_samples = floor(len // 256 * 256 / P) per process
            self.length = (dataset_len // trim * trim // num_processes) * num_processes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        rep = epoch_permutation(self.n, self.seed, self.epoch).repeat_interleave(self.repeats)
        # Global position k is item o of batch j, which process j % P takes as its step j // P:
        # that process's local position t = (j // P) * b + o, where RASampler puts rep[t * P + r].
        k = torch.arange(self.length)
        j, o = k // self.b, k % self.b
        t = (j // self.p) * self.b + o
        return iter(rep[(t * self.p + j % self.p) % len(rep)].tolist())


def size_choice(seed: int, epoch: int, step: int, ratios: tuple[float, ...]) -> int:
    """Which of the crop sizes the training step `step` of `epoch` draws, with probabilities
    `ratios`; the same on every process (the official multi-resolution loader's global seed)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, step, 0x512E]))
    return int(rng.choice(len(ratios), p=np.asarray(ratios) / sum(ratios)))


class MixedSizes(Sampler[int]):
    """A shuffled epoch (a permutation seeded by (seed, epoch)) whose index i comes as
    i + k x dataset_len, k = `size_choice` of the training step its batch belongs to: batch j of
    the global order goes to process j % P as its step j // P (Accelerate's round-robin), so all
    of one step's batches, on every process, share one choice of crop sizes (the dataset splits
    the index back: ImageDataset). Deterministic in (seed, epoch): call `set_epoch`."""

    def __init__(
        self,
        dataset_len: int,
        num_processes: int,
        batch_size: int,
        ratios: tuple[float, ...],
        seed: int = 0,
    ):
        self.n, self.p, self.b, self.ratios = dataset_len, num_processes, batch_size, ratios
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = epoch_permutation(self.n, self.seed, self.epoch).tolist()
        choices: dict[int, int] = {}
        for position, i in enumerate(order):
            step = position // self.b // self.p
            if step not in choices:
                choices[step] = size_choice(self.seed, self.epoch, step, self.ratios)
            yield i + choices[step] * self.n
