"""DataLoaders for data-parallel training and exact evaluation.

Training: a `DistributedSampler` (rank r takes perm[r::W] of a seed+epoch permutation), so global
batch b is perm[b*B*W:(b+1)*B*W] at any world size W: a 1-process run with the same global batch
sees the same batches in the same order as an N-rank job. The framework calls `set_epoch`.

Evaluation: a strided sampler with *no padding*, so every sample is evaluated exactly once.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Callable, Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from distrib.errors import ConfigError


def mix_seed(*parts: int) -> int:
    """A stable 63-bit seed from several integers (seed, rank, epoch, ...)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (p + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
    return h & (2**63 - 1)


class TrainSampler(DistributedSampler):
    """`DistributedSampler` that can start an epoch part-way, skipping consumed samples by index.

    Resuming mid-epoch then never reads (or decodes) the batches already trained on.
    """

    def __init__(self, dataset: Sized, *, num_replicas: int, rank: int, shuffle: bool, seed: int, drop_last: bool) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
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


def seed_worker(worker_id: int) -> None:
    """Seed python/numpy in a DataLoader worker from torch's per-worker seed.

    torch gives each worker `base_seed + worker_id`, and the base seed comes from the loader's own
    generator, which `TrainLoader.set_epoch` derives from (seed, rank, epoch): distinct per rank,
    worker and epoch, and reproducible on resume.
    """
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


@dataclasses.dataclass(kw_only=True)
class LoaderOptions:
    batch_size: int
    num_workers: int = 0
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    pin_memory: bool = False
    collate_fn: Callable[[list[Any]], Any] | None = None


def _dataloader(dataset: Dataset, sampler: Sampler[int], opts: LoaderOptions, *, drop_last: bool, generator: torch.Generator) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if opts.num_workers > 0:
        kwargs["persistent_workers"] = opts.persistent_workers
        if opts.prefetch_factor is not None:
            kwargs["prefetch_factor"] = opts.prefetch_factor
    return DataLoader(
        dataset,
        batch_size=opts.batch_size,
        sampler=sampler,
        num_workers=opts.num_workers,
        pin_memory=opts.pin_memory,
        drop_last=drop_last,
        collate_fn=opts.collate_fn,
        worker_init_fn=seed_worker,
        generator=generator,
        **kwargs,
    )


def _check_size(dataset: Sized, what: str, world_size: int) -> int:
    try:
        n = len(dataset)
    except TypeError:
        raise ConfigError(f"The {what} dataset has no len(); distrib needs a map-style Dataset with __len__ and __getitem__.") from None
    if n < world_size:
        raise ConfigError(
            f"The {what} dataset has {n} samples but the job has {world_size} processes, so some ranks "
            f"would get no data. HINT: use at least {world_size} samples (data.{what}_size) or fewer processes."
        )
    return n


class TrainLoader:
    """A training DataLoader plus the arithmetic the loop needs (micro-batch sizes per epoch)."""

    def __init__(self, dataset: Dataset, *, world_size: int, rank: int, seed: int, shuffle: bool, drop_last: bool, opts: LoaderOptions) -> None:
        _check_size(dataset, "train", world_size)
        self.seed, self.rank, self.drop_last = seed, rank, drop_last
        self.batch_size = opts.batch_size
        self.sampler = TrainSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.generator = torch.Generator()
        self.loader = _dataloader(dataset, self.sampler, opts, drop_last=drop_last, generator=self.generator)
        if self.num_batches(0) == 0:
            raise ConfigError(
                f"With data.drop_last=true, {self.sampler.num_samples} samples per rank make no full batch of "
                f"train.batch_size={opts.batch_size}. HINT: lower train.batch_size or set data.drop_last=false."
            )

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        """Called by the framework at the start of every epoch (users cannot forget it)."""
        self.sampler.set_epoch(epoch, skip_samples)
        self.generator.manual_seed(mix_seed(self.seed, self.rank, epoch, skip_samples))

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank trains on per epoch (DistributedSampler pads all ranks to the same count)."""
        return self.sampler.num_samples

    def micro_batch_sizes(self, skip_samples: int = 0) -> list[int]:
        """Sizes of this epoch's micro-batches on each rank (the same on every rank)."""
        n = self.sampler.num_samples - skip_samples
        full, rest = divmod(n, self.batch_size)
        return [self.batch_size] * full + ([] if self.drop_last or rest == 0 else [rest])

    def num_batches(self, skip_samples: int = 0) -> int:
        return len(self.micro_batch_sizes(skip_samples))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def eval_loader(dataset: Dataset, *, world_size: int, rank: int, opts: LoaderOptions) -> DataLoader:
    _check_size(dataset, "eval", world_size)
    sampler = EvalSampler(len(dataset), num_replicas=world_size, rank=rank)  # type: ignore[arg-type]
    g = torch.Generator()
    g.manual_seed(mix_seed(rank, 7))
    return _dataloader(dataset, sampler, opts, drop_last=False, generator=g)


def steps_per_epoch(num_micro_batches: int, grad_accum: int) -> int:
    return math.ceil(num_micro_batches / grad_accum)
