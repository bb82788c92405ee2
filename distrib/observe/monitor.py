"""What a user watches besides the metrics: peak memory, a progress bar, and a hang watchdog.
Interval timings and stragglers are in `interval.py`."""

from __future__ import annotations

import resource
import sys
import threading
import time
import traceback
from typing import Any

import torch

from distrib.runtime.console import log


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
            log.error(
                f"[watchdog] rank {self.rank}: no progress for {stalled:.0f} s (train.hang_timeout_s={self.timeout_s:g}); Python stacks of every thread follow"
            )
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
