"""Which samples each rank reads, and the seeds they are shuffled and augmented with.

Training: a `DistributedSampler` (rank r takes perm[r::W] of a seed+epoch permutation), so global
batch b is perm[b*B*W:(b+1)*B*W] at any world size W: a 1-process run with the same global batch
sees the same batches in the same order as an N-rank job. Evaluation: a strided sampler with *no
padding*, so every sample is evaluated exactly once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from typing import cast

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


def mix_seed(*parts: int) -> int:
    """A stable 63-bit seed from several integers (seed, rank, epoch, ...)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (p + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
    return h & (2**63 - 1)


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (every CUDA device too) from one 63-bit seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainSampler(DistributedSampler):
    """`DistributedSampler` that can start an epoch part-way, skipping consumed samples by index.

    Resuming mid-epoch then never reads (or decodes) the batches already trained on.
    """

    def __init__(self, dataset: Sized | Dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int, drop_last: bool) -> None:
        super().__init__(cast(Dataset, dataset), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation and skip this rank's first `skip` samples of it."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        it = super().__iter__()
        for _ in range(self.skip):
            next(it)
        return it

    def __len__(self) -> int:
        return self.num_samples - self.skip


class EvalSampler(Sampler[int]):
    """Rank r evaluates samples r, r+W, r+2W, ...: no padding, so each sample is counted once."""

    def __init__(self, size: int, *, num_replicas: int, rank: int) -> None:
        self.size, self.num_replicas, self.rank = size, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))
