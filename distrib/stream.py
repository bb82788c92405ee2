"""Streaming training data: an `IterableDataset` shared out over ranks and DataLoader workers.

A stream has no indices to hand out, so each rank's DataLoader workers read it and keep their share.
The share is the one a map-style dataset gets without shuffling: the stream's sample i belongs to
rank i mod W (global batch b is samples b·B·W to (b+1)·B·W - 1, as for any world size), and within a
rank, micro-batch j to worker j mod num_workers, which is the order in which the DataLoader takes
workers' batches. So over an epoch every sample is trained on once (the last round is padded from
the stream's start, as `DistributedSampler` pads, unless `data.drop_last`), and a stream run equals a
map-style run of the same samples with `data.shuffle=false`.

Its length: `len(dataset)` where the stream declares one (an `IterableDataset` may define
`__len__`); otherwise `train.max_steps` says how many samples the run reads, as one long epoch.

Cost: every worker of every rank reads the whole stream and skips what is not its own (what
Hugging Face's `split_dataset_by_node` does when shards do not divide evenly). A resume mid-epoch
reads the stream again from its start and skips the samples consumed before the checkpoint (the
"documented skip"): a dataset's own `state_dict` is not used, because its state lives in the worker
processes, which read ahead of the step the checkpoint is taken at.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from distrib.errors import BatchError


def is_stream(dataset: Any) -> bool:
    return isinstance(dataset, IterableDataset)


def declared_length(dataset: Any) -> int | None:
    """The stream's `len()`, or None when it declares none."""
    try:
        return len(dataset)
    except TypeError:
        return None


class StreamShard(IterableDataset):
    """The samples of one epoch's stretch that a rank's DataLoader worker yields, in the rank's order.

    `assign(start, count)` (the main process, before each epoch's iterator is made, so workers get
    it when they start) selects the rank's local samples `start .. start+count-1`; local sample k is
    the stream's sample `(rank + k·W) mod length`.
    """

    def __init__(self, stream: Iterable[Any], *, length: int, rank: int, world_size: int, batch_size: int) -> None:
        self.stream, self.length, self.rank, self.world_size, self.batch_size = stream, length, rank, world_size, batch_size
        self.start, self.count = 0, 0

    def assign(self, start: int, count: int) -> None:
        self.start, self.count = start, count

    def _mine(self, worker: int, workers: int) -> Iterator[int]:
        """This worker's local sample numbers, in order: the micro-batches j with j mod workers == worker."""
        b, end = self.batch_size, self.start + self.count
        for first in range(self.start + worker * b, end, workers * b):
            yield from range(first, min(first + b, end))

    def _local(self, i: int) -> list[int]:
        """The local sample numbers that are the stream's sample i on this rank (padding repeats the first ones)."""
        w, r, n = self.world_size, self.rank, self.length
        out = [(i - r) // w] if i >= r and (i - r) % w == 0 else []
        if (i + n - r) % w == 0:
            out.append((i + n - r) // w)  # the padded position r + k·W = n + i, past the stream's end
        return out

    def _is_mine(self, k: int, worker: int, workers: int) -> bool:
        return self.start <= k < self.start + self.count and (k - self.start) // self.batch_size % workers == worker

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self._mine(worker, workers)
        expected = next(mine, None)
        held: dict[int, Any] = {}  # samples read before their turn: only the padding from the stream's start
        seen = 0
        for i, sample in enumerate(self.stream):
            if expected is None or i >= self.length:
                break
            seen = i + 1
            for k in self._local(i):
                if self._is_mine(k, worker, workers):
                    held[k] = sample
            while expected is not None and expected in held:
                yield held.pop(expected)
                expected = next(mine, None)
        if expected is not None:
            raise BatchError(
                f"The training stream ended after {seen} samples, but distrib needs {self.length} this epoch (its declared "
                "len(), or what train.max_steps reads). HINT: make __len__ return the number of samples the stream yields, "
                "or lower train.max_steps. If the stream splits itself across DataLoader workers (get_worker_info()), "
                "remove that: distrib gives each worker its share, so every worker must read the whole stream."
            )
