"""What a user watches besides the metrics: peak memory and a progress bar.
Interval timings and stragglers are in `interval.py`; the hang watchdog in `hang.py`."""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated on this device. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


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
