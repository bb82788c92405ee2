"""Samplers and loaders: shuffling per epoch, disjoint shards, world-size-invariant global batches,
exact-once evaluation, distinct worker seeds."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from distrib.data.loaders import LoaderOptions, TrainLoader
from tests.unit.data.test_loaders import at  # the helpers both halves of this test module use


class SeedProbe(Dataset):
    """Each sample reports the RNG draws of the worker that loaded it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.tensor([torch.randint(0, 2**30, ()).item(), np.random.randint(0, 2**30), random.randint(0, 2**30)])


def worker_draws(rank: int, epoch: int) -> list[tuple[int, ...]]:
    ld = TrainLoader(SeedProbe(), world_size=2, rank=rank, seed=0, shuffle=False, drop_last=False, opts=LoaderOptions(batch_size=1, num_workers=2))
    return [tuple(mb.batch[0].tolist()) for mb in at(ld, epoch)]


def test_workers_are_seeded_per_rank_worker_and_epoch_and_reproducibly():
    draws = {(r, e): worker_draws(r, e) for r in (0, 1) for e in (0, 1)}
    # Worker w loads samples w, w+2, ...: its first draws are at positions 0 and 1.
    firsts = [d for v in draws.values() for d in v[:2]]
    assert len(set(firsts)) == len(firsts), "two (rank, worker, epoch) share an RNG stream"
    for v in firsts:
        assert len(set(v)) == 3  # torch, numpy and python draw differently too
    assert worker_draws(1, 1) == draws[(1, 1)]
