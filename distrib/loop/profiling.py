"""A session's profiling hooks: train.profile's step profiler, and the memory snapshot a CUDA OOM leaves.

`distrib.observe.profile` is imported only when train.profile is set or a CUDA OOM ends the run, so
a run without either starts and imports nothing of the profiler's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from distrib.config import Config
from distrib.runtime.ledger import LEDGER


class ProfileHooks:
    """What `Session` calls at a step's end, a train record, the session's end and an error (no-ops without train.profile)."""

    def __init__(self, cfg: Config, *, rank: int, device: torch.device, steps_done: Callable[[], int]) -> None:
        self.run_dir, self.rank, self.device = cfg.run.dir, rank, device
        self.profiler: Any = None
        if cfg.train.profile_window is not None:
            from distrib.observe.profile import StepProfiler

            self.profiler = StepProfiler(cfg.train.profile_window, run_dir=cfg.run.dir, rank=rank, device=device, steps_done=steps_done)
            LEDGER.step_begins = self.profiler.begin  # a step's range opens as its first micro-batch is fetched

    def stepped(self, step: int) -> None:
        if self.profiler is not None:
            self.profiler.end(step)

    def mark(self, kind: str, step: int, record: dict[str, Any]) -> dict[str, Any]:
        return self.profiler.mark(kind, step, record) if self.profiler is not None else record

    def close(self, error: BaseException | None) -> None:
        if self.profiler is not None:
            LEDGER.step_begins = None
            self.profiler.close()
        if isinstance(error, torch.OutOfMemoryError) and self.device.type == "cuda":
            from distrib.observe.profile import oom_snapshot

            oom_snapshot(self.run_dir, self.rank)
