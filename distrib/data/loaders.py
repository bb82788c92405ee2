"""The train and eval loaders: DataLoaders over distrib's samplers (`sampling.py`) that yield
device batches; the train loader groups them into optimizer steps with exact weights
(`accumulate.py`) and keeps the position a checkpoint resumes from. It calls `set_epoch` itself.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from distrib.config import DataConfig
from distrib.data.accumulate import ItemCounter, MicroBatch, StepCount
from distrib.data.sampling import EvalSampler, TrainSampler, mix_seed
from distrib.data.stream import Position, PositionedCollate, StreamShard, declared_length, is_stream, stream_length
from distrib.data.transfer import device_batches, leading_dim
from distrib.data.workers import init_worker, worker_context
from distrib.errors import BatchError, ConfigError
from distrib.runtime.ledger import COMPUTING, LEDGER


@dataclasses.dataclass(kw_only=True)
class LoaderOptions:
    batch_size: int
    num_workers: int = 0
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    pin_memory: bool = False
    collate_fn: Callable[[list[Any]], Any] | None = None

    @classmethod
    def of(cls, data: DataConfig, *, batch_size: int, collate_fn: Callable[[list[Any]], Any] | None, device: torch.device) -> LoaderOptions:
        """The options `data.*` sets, for batches of `batch_size` bound for `device`."""
        return cls(
            batch_size=batch_size,
            num_workers=data.num_workers,
            persistent_workers=data.persistent_workers,
            prefetch_factor=data.prefetch_factor,
            collate_fn=collate_fn,
            pin_memory=device.type == "cuda",
        )  # pinned host memory only helps a CUDA copy


def _dataloader(
    dataset: Dataset,
    sampler: Sampler[int] | None,
    opts: LoaderOptions,
    *,
    drop_last: bool,
    generator: torch.Generator,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if opts.num_workers > 0:
        kwargs["persistent_workers"] = opts.persistent_workers
        kwargs["multiprocessing_context"] = worker_context()
        if opts.prefetch_factor is not None:
            kwargs["prefetch_factor"] = opts.prefetch_factor
    return DataLoader(
        dataset,
        batch_size=opts.batch_size,
        sampler=sampler,
        num_workers=opts.num_workers,
        pin_memory=opts.pin_memory,
        drop_last=drop_last,
        collate_fn=collate_fn or opts.collate_fn,
        worker_init_fn=init_worker,
        generator=generator,
        **kwargs,
    )


def _check_size(dataset: Any, what: str, world_size: int) -> int:
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
    """The training loader: a `DistributedSampler` DataLoader that yields device `MicroBatch`es.

    Iterating it runs the rest of the current epoch: it calls `set_epoch` itself, groups
    micro-batches into optimizer steps of `grad_accum`, weights each exactly (the epoch's short last
    step included), and keeps the position (`epoch`, `step`, samples) that `state_dict` checkpoints,
    so a resumed run continues at the next unseen batch without reading the consumed ones.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        world_size: int,
        rank: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        opts: LoaderOptions,
        device: torch.device = torch.device("cpu"),
        prefetch: bool = True,
        grad_accum: int = 1,
        items: ItemCounter | None = None,
        max_steps: int | None = None,
    ) -> None:
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self.batch_size, self.grad_accum, self.items = opts.batch_size, grad_accum, items
        self.device, self.prefetch = device, prefetch
        self.generator = torch.Generator()
        self.stream: StreamShard | None = None
        """For an IterableDataset: the share of the stream this rank's workers read (`distrib.data.stream`)."""
        if is_stream(dataset):
            n = stream_length(dataset, max_steps, opts.batch_size * grad_accum * world_size, workers=opts.num_workers, persistent=opts.persistent_workers)
            _check_size(range(n), "train", world_size)
            # The sampler only does the arithmetic (samples per rank, padding, skip); the stream is read in its order.
            self.sampler = TrainSampler(range(n), num_replicas=world_size, rank=rank, shuffle=False, seed=seed, drop_last=drop_last)
            self.stream = StreamShard(cast(Iterable[Any], dataset), length=n, rank=rank, world_size=world_size, batch_size=opts.batch_size)
            collate = PositionedCollate(opts.collate_fn or default_collate, self.stream) if self.stream.stateful else None
            self.loader = _dataloader(self.stream, None, opts, drop_last=drop_last, generator=self.generator, collate_fn=collate)
        else:
            _check_size(dataset, "train", world_size)
            self.sampler = TrainSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
            self.loader = _dataloader(dataset, self.sampler, opts, drop_last=drop_last, generator=self.generator)
        self._size = len(self.sampler.dataset) if self.stream is None or declared_length(dataset) is not None else None  # type: ignore[arg-type]
        if self.num_batches(0) == 0:
            raise ConfigError(
                f"With data.drop_last=true, {self.sampler.num_samples} samples per rank make no full batch of "
                f"train.batch_size={opts.batch_size}. HINT: lower train.batch_size or set data.drop_last=false."
            )
        self._epoch_total = sum(self.micro_batch_sizes(0))
        self._epoch = 0
        self.epoch_samples = 0
        """Samples this rank consumed in the current epoch, at the last step boundary."""
        self.step = 0
        """Optimizer steps begun: incremented as a step's last micro-batch is handed out."""
        self.samples_seen = 0
        """Global samples handed out in whole steps (all ranks)."""
        self.splits: list[dict[str, int]] = [self._split()]
        """Each layout the run has trained with, from the step it started at: world size, micro-batch, accumulation."""
        self.wait_s = 0.0
        """Seconds spent waiting for batches (the input pipeline); the monitor reads and resets it."""
        self._positions: collections.deque[Position | None] = collections.deque()  # a stateful stream's, read ahead with its batches
        self._position: Position | None = None  # ... of the micro-batch handed out last
        self._resume_position: Position | None = None
        self._recent: collections.deque[tuple[int, int, int, int]] = collections.deque(maxlen=4096)  # (step, epoch, first sample, samples)

    # ------------------------------------------------------------------ position

    @property
    def epoch(self) -> int:
        """The epoch the next micro-batch comes from (the current one is over once all its steps were handed out)."""
        return self._epoch + (self.epoch_samples >= self._epoch_total)

    @property
    def current_epoch(self) -> int:
        """The epoch of the step handed out last (the epoch under way, or just finished)."""
        return self._epoch

    @property
    def epoch_done(self) -> bool:
        """Every step of the current epoch has been handed out (a loop broken after the last one included)."""
        return self.epoch_samples >= self._epoch_total

    @property
    def global_batch(self) -> int:
        """Samples in a full optimizer step over all ranks."""
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def dataset_size(self) -> int | None:
        """Samples in one epoch of the training set (before the sampler pads or drops any); None for a stream
        with no len() (its epoch is train.max_steps long)."""
        return self._size

    def _split(self) -> dict[str, int]:
        return {"step": self.step, "world_size": self.world_size, "micro_batch": self.batch_size, "grad_accum": self.grad_accum}

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "epoch_samples": 0 if self.epoch_done else self.epoch_samples,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "world_size": self.world_size,
            "global_batch": self.global_batch,
            "dataset_size": self.dataset_size,
            "splits": self.splits,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` was saved; from another world size, at the same global sample count."""
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.splits = [*state.get("splits", [])]  # (a checkpoint before splits were kept: this one on)
        if not self.splits or {**self.splits[-1], "step": 0} != {**self._split(), "step": 0}:
            self.splits.append(self._split())
        samples = state["epoch_samples"] * state["world_size"] // self.world_size
        if samples == 0 and state["epoch"] > 0:
            # Saved at an epoch's end: the same position as before the save, "epoch e done" (its eval may be due).
            self._epoch, self.epoch_samples = state["epoch"] - 1, self._epoch_total
        else:
            self._epoch, self.epoch_samples = state["epoch"], samples

    def rank_state_dict(self) -> dict[str, Any] | None:
        """This rank's part of the position, checkpointed in its own file: a stateful stream's state
        after the last micro-batch it handed out (None when there is nothing to resume from)."""
        if self._position is None or self.epoch_done:
            return None
        return {"epoch": self._epoch, "epoch_samples": self.epoch_samples, "position": self._position}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """After `load_state_dict`: read the stream on from `state`'s position if it is this position's."""
        same = (state["epoch"], state["epoch_samples"]) == (self._epoch, self.epoch_samples)
        self._resume_position = state["position"] if same and self.stream is not None and self.stream.stateful else None

    def steps_left(self, epochs: int) -> int:
        """Optimizer steps from here to the end of epoch `epochs` (at this world size and batch size)."""
        if self.epoch_done:
            return max(epochs - self._epoch - 1, 0) * self.steps_per_epoch
        if self._epoch >= epochs:
            return 0
        current = steps_per_epoch(self.num_batches(self.epoch_samples), self.grad_accum)
        return current + (epochs - self._epoch - 1) * self.steps_per_epoch

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        """Select the epoch's permutation and skip this rank's first `skip_samples` (the loader calls it)."""
        self.sampler.set_epoch(epoch, skip_samples)
        self.generator.manual_seed(mix_seed(self.seed, self.rank, epoch, skip_samples))
        if self.stream is not None:  # before the iterator starts the workers, which take a copy
            resume, self._resume_position = (self._resume_position if skip_samples else None), None
            self.stream.assign(skip_samples, sum(self.micro_batch_sizes(skip_samples)), resume)

    # ------------------------------------------------------------------ arithmetic

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

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_batches(0), self.grad_accum)

    # ------------------------------------------------------------------ iteration

    def _next(self, it: Iterator[Any], expected: int) -> Any:
        LEDGER.next_micro()
        waited = time.perf_counter()
        batch = next(it)
        self.wait_s += time.perf_counter() - waited
        if self._positions:
            self._position = self._positions.popleft()
        n = leading_dim(batch)
        if n != expected:
            raise BatchError(
                f"A micro-batch has {n} samples where the sampler arithmetic expects {expected}. distrib "
                "weights losses by the known step size; HINT: do not change batch sizes in collate_fn or the Dataset."
            )
        return batch

    def _positioned(self, loader: Iterable[Any]) -> Iterator[Any]:
        """A stateful stream's batches without their positions, which queue up in order (the device
        prefetcher reads a batch ahead; `_next` takes the position of the batch it hands out)."""
        for item in loader:
            self._positions.append(item.position)
            yield item.batch

    def __iter__(self) -> Iterator[MicroBatch]:
        if self.epoch_done:  # roll over to the next epoch
            self._epoch, self.epoch_samples = self._epoch + 1, 0
        epoch, skip = self._epoch, self.epoch_samples
        self.set_epoch(epoch, skip)
        sizes = self.micro_batch_sizes(skip)
        self._positions.clear()
        source = self._positioned(self.loader) if self.stream is not None and self.stream.stateful else self.loader
        it = iter(device_batches(source, self.device, prefetch=self.prefetch))
        world, accum = self.world_size, self.grad_accum
        for start in range(0, len(sizes), accum):
            group = sizes[start : start + accum]
            local = sum(group)
            if self.items is None:
                # Samples: every rank holds the same count, so the weights are host arithmetic.
                pending = None
                local_items: Any = local
                count: Any = local * world
            else:
                # Items (tokens) differ per micro-batch and rank: load the step's micro-batches first,
                # count on the device and sum over ranks once per step (no host sync; one small
                # all-reduce, running while the forward computes).
                pending = [self._next(it, n) for n in group]
                counts = [self.items(b) for b in pending]
                # An integer count, as Hugging Face's Trainer passes it (a loss divided by it stays float32).
                local_items = torch.stack([torch.as_tensor(c, device=self.device) for c in counts]).sum()
                count = StepCount(local_items)
            for j, n in enumerate(group):
                batch = pending[j] if pending is not None else self._next(it, n)
                last = j == len(group) - 1
                if last:  # the position advances as the step's last micro-batch is handed out
                    self._recent.append((self.step + 1, epoch, self.epoch_samples, local))
                    self.step += 1
                    self.epoch_samples += local
                    self.samples_seen += local * world
                LEDGER.at(COMPUTING)
                yield MicroBatch(
                    batch=batch,
                    size=n,
                    items=n if pending is None else counts[j],
                    local_step_items=local_items,
                    world_size=world,
                    last=last,
                    epoch=epoch,
                    count=count,
                )

    def samples_of(self, step: int) -> str:
        """This rank's samples of a recent optimizer step, as a person would look them up (for error messages)."""
        found = next((r for r in self._recent if r[0] == step), None)
        if found is None:
            return f"step {step} is not among the last {self._recent.maxlen} steps this rank took"
        _, epoch, start, count = found
        if self.stream is not None:
            return f"epoch {epoch}, this rank's samples {start} to {start + count - 1} of its share of the stream"
        sampler = copy.copy(self.sampler)  # the same permutation, without moving the live one
        sampler.set_epoch(epoch)
        indices = list(itertools.islice(iter(sampler), start, start + count))
        shown = ", ".join(map(str, indices[:16])) + (", ..." if len(indices) > 16 else "")
        return f"epoch {epoch}, dataset indices [{shown}]"

    def __len__(self) -> int:
        """Micro-batches left in the current epoch."""
        return self.num_batches(0 if self.epoch_done else self.epoch_samples)


class EvalLoader:
    """Evaluation batches on the device: rank r takes samples r, r+W, ... with no padding, so each counts once."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        world_size: int,
        rank: int,
        opts: LoaderOptions,
        device: torch.device = torch.device("cpu"),
        prefetch: bool = True,
        even: bool = False,
    ) -> None:
        self.loader = eval_dataloader(dataset, world_size=world_size, rank=rank, opts=opts)
        self.device, self.prefetch = device, prefetch
        self.common_batches = math.ceil(len(dataset) // world_size / opts.batch_size)  # type: ignore[arg-type]
        """Batches every rank has (ranks differ by at most one sample, so by at most one batch): where all can meet."""
        most = math.ceil(math.ceil(len(dataset) / world_size) / opts.batch_size)  # type: ignore[arg-type]
        self.filler_batches = most - len(self.loader) if even else 0
        """With `even` (an FSDP model, whose forward gathers parameters in a collective every rank must join):
        the forward passes (0 or 1) this rank runs after its own batches, on any batch, uncounted, so that
        every rank runs as many. 0 otherwise."""

    def __iter__(self) -> Iterator[Any]:
        return iter(device_batches(self.loader, self.device, prefetch=self.prefetch))

    def __len__(self) -> int:
        return len(self.loader)


def eval_dataloader(dataset: Dataset, *, world_size: int, rank: int, opts: LoaderOptions) -> DataLoader:
    if is_stream(dataset):
        raise ConfigError(
            f"The eval dataset is a stream ({type(dataset).__name__}, an IterableDataset); counting every eval sample "
            "exactly once over the ranks needs indices. HINT: pass the held-out set as a map-style Dataset (a list works)."
        )
    _check_size(dataset, "eval", world_size)
    sampler = EvalSampler(len(dataset), num_replicas=world_size, rank=rank)  # type: ignore[arg-type]
    g = torch.Generator()
    g.manual_seed(mix_seed(rank, 7))
    return _dataloader(dataset, sampler, opts, drop_last=False, generator=g)


def steps_per_epoch(num_micro_batches: int, grad_accum: int) -> int:
    return math.ceil(num_micro_batches / grad_accum)
