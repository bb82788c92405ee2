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
Hugging Face's `split_dataset_by_node` does when shards do not divide evenly).

Resume mid-epoch, two ways:
- A stateful stream (it has `state_dict()` and `load_state_dict()`, as Hugging Face's and torchdata's
  streams do) resumes from its own state. Its state lives in the worker processes, which read ahead
  of the training step, so each micro-batch carries the state the stream had right after its last
  sample (`Positioned`, taken in the worker as the batch is collated); the rank's checkpoint file
  keeps the one of the step's last micro-batch, with the index of the next sample to read. On
  resume every worker loads it and reads on from there, nothing read twice. Contract: after
  `load_state_dict(s)`, iterating the stream yields the samples that followed when `s` was taken.
- Otherwise (or at another world size, or when the rest of the epoch needs the padding from the
  stream's start) the stream is read again from its start and the samples consumed before the
  checkpoint are skipped: exact, at the cost of reading them again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, cast

import torch
from torch.utils.data import IterableDataset, get_worker_info

from distrib.errors import BatchError, ConfigError
from distrib.runtime.console import log


def is_stream(dataset: Any) -> bool:
    return isinstance(dataset, IterableDataset)


def declared_length(dataset: Any) -> int | None:
    """The stream's `len()`, or None when it declares none."""
    try:
        return len(dataset)
    except TypeError:
        return None


def stream_length(dataset: Any, max_steps: int | None, step_samples: int, *, workers: int, persistent: bool) -> int:
    """Samples in one epoch of a stream: its declared len(), else what train.max_steps reads."""
    if workers > 0 and persistent:
        raise ConfigError(
            "data.persistent_workers=true with a streaming (Iterable) training dataset: its workers must start "
            "each epoch afresh to read their share of it. HINT: pass --data.persistent_workers false."
        )
    n = declared_length(dataset)
    if n is None:
        if max_steps is None:
            raise ConfigError(
                f"The training dataset is a stream ({type(dataset).__name__}, an IterableDataset) with no len() and train.max_steps "
                "is not set, so no rank can know where an epoch ends. HINT: give it a __len__ returning the samples it yields "
                "per pass, or pass --train.max_steps N (the run then reads N steps of it as one epoch)."
            )
        n = max_steps * step_samples
    if n < 1:
        raise ConfigError(f"The training stream ({type(dataset).__name__}) declares len() = {n}. HINT: make __len__ return the samples it yields.")
    return n


def is_stateful(stream: Any) -> bool:
    """The stream can say where it is and resume there (`state_dict` / `load_state_dict`)."""
    return callable(getattr(stream, "state_dict", None)) and callable(getattr(stream, "load_state_dict", None))


Position = tuple  # (the stream's state_dict(), the index of the next sample it yields)


class Positioned(NamedTuple):
    """A micro-batch with the stream's position after its last sample (a NamedTuple: pin_memory keeps it)."""

    batch: Any
    position: Position | None


class PositionedCollate:
    """collate_fn for a stateful stream: the batch, and the position its worker's shard reached."""

    def __init__(self, collate: Callable[[list[Any]], Any], shard: StreamShard) -> None:
        self.collate, self.shard = collate, shard

    def __call__(self, samples: list[Any]) -> Positioned:
        info = get_worker_info()
        shard = cast(StreamShard, info.dataset) if info is not None else self.shard  # a worker's own copy of the shard
        return Positioned(self.collate(samples), shard.position)


class StreamShard(IterableDataset):
    """The samples of one epoch's stretch that a rank's DataLoader worker yields, in the rank's order.

    `assign(start, count)` (the main process, before each epoch's iterator is made, so workers get
    it when they start) selects the rank's local samples `start .. start+count-1`; local sample k is
    the stream's sample `(rank + k·W) mod length`.
    """

    def __init__(self, stream: Iterable[Any], *, length: int, rank: int, world_size: int, batch_size: int) -> None:
        self.stream, self.length, self.rank, self.world_size, self.batch_size = stream, length, rank, world_size, batch_size
        self.stateful = is_stateful(stream)
        """Batches carry positions (`PositionedCollate`); fixed for the shard's life."""
        self._uncapturable = False  # its state_dict() cannot go into a checkpoint: stop taking it (warned once)
        self.start, self.count = 0, 0
        self.resume: Position | None = None
        self.position: Position | None = None
        """Stateful streams: the position after the last sample of the micro-batch yielded last."""

    def assign(self, start: int, count: int, resume: Position | None = None) -> None:
        """Select local samples `start .. start+count-1`; `resume`: a stateful stream's position to read on from."""
        if resume is not None and (resume[1] > self.rank + start * self.world_size or self.rank + (start + count - 1) * self.world_size >= self.length):
            # Past this rank's next sample (not this position's checkpoint), or the epoch's padding is
            # still to come, which repeats the stream's first samples: read from the start instead.
            resume = None
        self.start, self.count, self.resume, self.position = start, count, resume, None

    def _ends_batch(self, k: int) -> bool:
        return (k - self.start) % self.batch_size == self.batch_size - 1 or k == self.start + self.count - 1

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
        stream, first = self._opened(in_worker=info is not None)
        seen = first
        for i, sample in enumerate(stream, start=first):
            if expected is None or i >= self.length:
                break
            seen = i + 1
            for k in self._local(i):
                if self._is_mine(k, worker, workers):
                    held[k] = sample
            while expected is not None and expected in held:
                if self.stateful and not self._uncapturable and self._ends_batch(expected):
                    self.position = self._capture(stream, i + 1)  # before the yield: the collate runs right after it
                yield held.pop(expected)
                expected = next(mine, None)
        if expected is not None:
            raise BatchError(
                f"The training stream ended after {seen} samples, but distrib needs {self.length} this epoch (its declared "
                "len(), or what train.max_steps reads). HINT: make __len__ return the number of samples the stream yields, "
                "or lower train.max_steps. If the stream splits itself across DataLoader workers (get_worker_info()), "
                "remove that: distrib gives each worker its share, so every worker must read the whole stream."
            )

    def _capture(self, stream: Any, index: int) -> Position | None:
        """The stream's position now, if a checkpoint can hold it; else None (a resume then skips)."""
        try:
            state = copy.deepcopy(stream.state_dict())  # a copy: a stream may update its state in place
            problem = _not_plain(state, "state_dict()")
        except Exception as exc:  # noqa: BLE001 - e.g. a lock in the state: not a reason to stop training
            problem = f"state_dict() cannot be copied ({type(exc).__name__}: {exc})"
        if problem is None:
            return state, index
        if not self._uncapturable:  # once (per worker): it stops trying
            log.warning(
                f"the training stream's {problem}; a checkpoint holds plain data only (numbers, strings, tensors, "
                "lists, dicts), so a resume will read the stream again and skip what was consumed. HINT: return plain "
                "values from state_dict() (int(x) for a numpy number, a tensor for an array)"
            )
            self._uncapturable = True
        return None

    def _opened(self, *, in_worker: bool) -> tuple[Any, int]:
        """The stream to read and the index of its first sample: at `resume` when there is one."""
        if self.resume is None:
            return self.stream, 0
        stream = self.stream
        if not in_worker:  # the main process reads the user's own object: leave it as it was for later epochs
            try:
                stream = copy.deepcopy(stream)
            except Exception as exc:  # noqa: BLE001 - any failure to copy: fall back to the exact skip
                log.info(f"the training stream cannot be copied ({exc}); resuming by reading it again from its start")
                return self.stream, 0
        state, index = self.resume
        try:
            stream.load_state_dict(state)  # type: ignore[attr-defined]  # self.stateful: it has one
        except Exception as exc:
            raise BatchError(
                f"Resuming the training stream ({type(self.stream).__name__}) from the state its state_dict() gave, "
                f"load_state_dict raised {type(exc).__name__}: {exc}. The checkpoint is intact. HINT: fix load_state_dict "
                "so it accepts what state_dict returns, or remove both methods: distrib then resumes by reading the stream "
                "again and skipping what was consumed."
            ) from exc
        return stream, index


def _not_plain(obj: Any, where: str) -> str | None:
    """Where `obj` holds something a checkpoint cannot load back (it loads plain data only), or None."""
    if type(obj) in (type(None), bool, int, float, str, bytes) or isinstance(obj, torch.Tensor):
        return None  # exact types: a numpy float64 is a float, but not plain data to torch.load
    if type(obj) in (list, tuple):
        return next((p for j, v in enumerate(obj) if (p := _not_plain(v, f"{where}[{j}]"))), None)
    if type(obj) is dict:
        return next((p for k, v in obj.items() if (p := _not_plain(k, f"{where} key") or _not_plain(v, f"{where}[{k!r}]"))), None)
    return f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}"
