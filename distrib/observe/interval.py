"""The log interval's numbers from every rank, in the one all-reduce that happens there anyway.

At each log interval `Metrics.compute` all-reduces the metric sums; the numbers below ride on the
same collective as a tail of floats: the stop ballot, the interval's data wait and wall time, and
each rank's step time and peak memory (one-hot: a rank fills its own slot, the sum is every rank's
value). `IntervalSums` packs and unpacks that tail, so its layout is written down once.

Timings are host clocks read around the data wait and the synchronising backward; reading a
clock is not a device sync, so the hot path stays free of them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from distrib.observe.monitor import peak_memory_bytes
from distrib.runtime.console import log


@dataclasses.dataclass
class IntervalTimes:
    """This rank's clocks for the current log interval."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    """Seconds spent waiting for the next batch (the input pipeline)."""
    sync: float = 0.0
    """Seconds in the backward passes that all-reduce: where a fast rank waits for a slow one."""


class Stragglers:
    """Names a slow rank only when it matters: a spread above the threshold, sustained, on steps long enough.

    One interval's spread is noise on a busy machine (tiny steps, a scheduler's hiccup, a save in
    the background), so a rank is named only after `intervals` log intervals in a row in which it was
    the slowest by more than `threshold` *and* by at least `min_gap_s` per step, the time the others
    actually wait for it. It stays named while that holds; one interval without resets the count.
    """

    def __init__(self, threshold: float, *, intervals: int = 3, min_gap_s: float = 0.005) -> None:
        self.threshold, self.intervals, self.min_gap_s = threshold, intervals, min_gap_s
        self._rank: int | None = None
        self._streak = 0

    def check(self, own: list[float]) -> int | None:
        """The rank named a straggler for this interval (`own`: each rank's step time), or None."""
        slow, fast = max(range(len(own)), key=own.__getitem__), min(range(len(own)), key=own.__getitem__)
        gap = own[slow] - own[fast]
        if len(own) > 1 and own[slow] > 0 and gap / own[slow] > self.threshold and gap >= self.min_gap_s:
            self._streak = self._streak + 1 if slow == self._rank else 1
            self._rank = slow
        else:
            self._rank, self._streak = None, 0
        return self._rank if self._streak >= self.intervals else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntervalSums:
    """The log interval's extra numbers, summed over ranks."""

    stop_ballot: list[float]
    """Per stop signal, how many ranks got it (`StopRequest.count` reads it)."""
    data_wait_s: float
    """Seconds the ranks waited for batches, summed."""
    elapsed_s: float
    """The interval's wall time, summed over ranks (divide by the world size for the mean)."""
    step_time_s: list[float]
    """Each rank's own time per step, excluding its wait in the gradient all-reduce."""
    peak_mem_bytes: list[float]
    """Each rank's peak memory."""

    @staticmethod
    def local(*, ballot: Sequence[float], times: IntervalTimes, rank: int, world_size: int, device: torch.device, steps: int) -> list[float]:
        """This rank's contribution: its ballot, its clocks, and its one-hot slots."""
        elapsed = time.perf_counter() - times.start
        own = [0.0] * world_size
        own[rank] = max(elapsed - times.sync, 0.0) / max(steps, 1)
        mem = [0.0] * world_size
        mem[rank] = float(peak_memory_bytes(device))
        return [*ballot, times.data_wait, elapsed, *own, *mem]

    @classmethod
    def unpack(cls, summed: Sequence[float], *, ballot_len: int, world_size: int) -> IntervalSums:
        """The record from the all-reduced tail that `local` packed."""
        b, w = ballot_len, world_size
        if len(summed) != b + 2 + 2 * w:
            raise ValueError(f"an interval tail of {len(summed)} numbers; expected {b + 2 + 2 * w}")
        return cls(
            stop_ballot=list(summed[:b]),
            data_wait_s=summed[b],
            elapsed_s=summed[b + 1],
            step_time_s=list(summed[b + 2 : b + 2 + w]),
            peak_mem_bytes=list(summed[b + 2 + w :]),
        )


def interval_fields(sums: IntervalSums, stragglers: Stragglers, *, warn: bool) -> dict[str, Any]:
    """The interval's timing fields of metrics.jsonl; warn (if `warn`: rank 0) about a sustained straggler."""
    data_wait, elapsed, own, mem = sums.data_wait_s, sums.elapsed_s, sums.step_time_s, sums.peak_mem_bytes
    world_size = len(own)
    slow, fast = max(range(world_size), key=own.__getitem__), min(range(world_size), key=own.__getitem__)
    fields: dict[str, Any] = {
        "data_wait_frac": data_wait / elapsed if elapsed > 0 else 0.0,
        "peak_mem_bytes": int(max(mem)),
        "rank_step_time_max_s": own[slow],
        "rank_step_time_min_s": own[fast],
        "slowest_rank": slow,
        "fastest_rank": fast,
    }
    named = stragglers.check(own)
    if named is not None:
        fields["straggler"] = named
        if warn:
            log.warning(
                f"straggler: rank {slow} takes {own[slow] * 1e3:.1f} ms per step, rank {fast} {own[fast] * 1e3:.1f} ms "
                f"(over {stragglers.threshold:.0%} slower, train.straggler_threshold, for {stragglers.intervals}+ log intervals "
                "in a row); the others wait for it at every all-reduce"
            )
    return fields


def interval_rates(
    sums: IntervalSums,
    *,
    samples: int,
    items: float | None,
    steps: int,
    tokens_per_sample: float | None,
    flops_per_sample: float | None,
    peak_flops: float | None,
    stragglers: Stragglers,
    warn: bool,
) -> dict[str, Any]:
    """The interval's throughput and timing fields of a metrics.jsonl train line, in the order they are written.

    `samples` and `items` (tokens, when the loss counts them) are the interval's global totals;
    tokens/s comes from them, else from the task's declared `tokens_per_sample`; MFU needs the task's
    FLOPs per sample and `train.peak_flops`.
    """
    world = len(sums.step_time_s)
    elapsed = sums.elapsed_s / world  # the interval's wall time, averaged over ranks
    samples_per_s = samples / elapsed if elapsed > 0 else 0.0
    fields: dict[str, Any] = {
        "interval_samples": samples,
        "samples_per_s": samples_per_s,
        "step_time_s": elapsed / max(steps, 1),
        **interval_fields(sums, stragglers, warn=warn),
    }
    if items is not None:
        fields["tokens"] = items
        fields["tokens_per_s"] = items / elapsed if elapsed > 0 else 0.0
    elif tokens_per_sample:
        fields["tokens_per_s"] = samples_per_s * tokens_per_sample
    if flops_per_sample and peak_flops:
        fields["mfu"] = samples_per_s * flops_per_sample / (peak_flops * world)
    return fields
