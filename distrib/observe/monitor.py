"""What a user watches: interval timings, stragglers, peak memory, a progress bar, and a hang watchdog.

Timings are host clocks read around the data wait and the synchronising backward; reading a
clock is not a device sync, so the hot path stays free of them. They are summed per interval and
travel in the log interval's one all-reduce.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import threading
import time
import traceback
from typing import Any

import torch

from distrib.runtime.console import log


@dataclasses.dataclass
class IntervalTimes:
    """This rank's clocks for the current log interval."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    """Seconds spent waiting for the next batch (the input pipeline)."""
    sync: float = 0.0
    """Seconds in the backward passes that all-reduce: where a fast rank waits for a slow one."""

    def extras(self, rank: int, world_size: int, device: torch.device, steps: int) -> list[float]:
        """[data_wait, elapsed, own step time per rank (one-hot), peak memory per rank (one-hot)]."""
        elapsed = time.perf_counter() - self.start
        own = [0.0] * world_size
        own[rank] = max(elapsed - self.sync, 0.0) / max(steps, 1)
        mem = [0.0] * world_size
        mem[rank] = float(peak_memory_bytes(device))
        return [self.data_wait, elapsed, *own, *mem]


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


def interval_fields(reduced: list[float], world_size: int, stragglers: Stragglers, *, warn: bool) -> dict[str, Any]:
    """Turn the all-reduced extras into metrics.jsonl fields; warn (if `warn`: rank 0) about a sustained straggler."""
    data_wait, elapsed = reduced[0], reduced[1]
    own = reduced[2 : 2 + world_size]
    mem = reduced[2 + world_size : 2 + 2 * world_size]
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


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated on this device. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def thread_stacks() -> list[str]:
    """Every other thread's Python stack as lines, most recent call last, each headed by the thread's name."""
    names = {t.ident: t.name for t in threading.enumerate()}
    lines: list[str] = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue  # the caller (the watchdog) is no news
        lines.append(f"Thread {names.get(ident, '?')!r} (0x{ident:x}), most recent call last:")
        lines += [part for entry in traceback.format_stack(frame) for part in entry.rstrip("\n").split("\n")]
    return lines


class Watchdog:
    """Dumps this rank's Python stacks when no progress is reported for `timeout_s`.

    `beat()` is one attribute store (free on the hot path); a daemon thread checks it once a second.
    Each rank runs its own, so a stuck collective shows where every rank is: the hung one in its
    own code, the others inside the collective.
    """

    def __init__(self, timeout_s: float | None, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self.last = time.monotonic()
        self._fired = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timeout_s is not None:
            self._thread = threading.Thread(target=self._watch, name="distrib-watchdog", daemon=True)
            self._thread.start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        assert self.timeout_s is not None
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            stalled = time.monotonic() - self.last
            if stalled < self.timeout_s:
                self._fired = False
                continue
            if self._fired:
                continue
            self._fired = True  # once per stall; a later beat re-arms it
            log.error(f"[watchdog] rank {self.rank}: no progress for {stalled:.0f} s (train.hang_timeout_s={self.timeout_s:g}); Python stacks of every thread follow")
            # One log record per line: every line carries the rank prefix, and each is one short
            # write, so the dumps of ranks that share a terminal or a Slurm log stay readable
            # (faulthandler writes fragments that interleave mid-line across processes).
            for line in thread_stacks():
                log.error(line)
            for h in log.handlers:
                h.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Progress:
    """A tqdm bar on rank 0 when wanted (a terminal), else nothing: the log lines carry the news."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout, smoothing=0.1)

    @property
    def active(self) -> bool:
        return self._bar is not None

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def show(self, **fields: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=True)

    def write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
