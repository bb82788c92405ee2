"""`train.profile`: torch.profiler over a window of optimizer steps, one trace per rank in run.dir/profile/.

Imported only when train.profile is set: a run without it starts no profiler and imports nothing of this.
The trace (`rank<R>.steps<F>-<L>.pt.trace.json`) is Chrome's trace format, which Perfetto
(ui.perfetto.dev), chrome://tracing and TensorBoard's profiler plugin open. Each optimizer step in it
is a `ProfilerStep#N` range, N numbering steps as metrics.jsonl does, from the fetch of its first
micro-batch to the end of its optimizer step (an eval between steps lies between two ranges). On
CUDA the caching allocator's history over the window is kept too, as a memory snapshot beside the
trace (`.memory.pickle`, for pytorch.org/memory_viz), and a CUDA out-of-memory error that ends the
run leaves `rank<R>.oom.memory.pickle` (`oom_snapshot`, called whether or not a window was asked for).
The steps traced are marked in metrics.jsonl (`profiled` on the train records they fall in): the
profiler slows them, so their throughput is not the run's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distrib.checkpoint.fileio import check_own, foreign_dir, storage_error
from distrib.checkpoint.rundir import PROFILE_DIR
from distrib.errors import ConfigError
from distrib.runtime.console import log


def profile_dir(run_dir: str | Path, *, create: bool = True) -> Path:
    """run.dir/profile/ (created if need be): never through a link or over a file distrib did not make."""
    path = Path(run_dir) / PROFILE_DIR
    what = foreign_dir(path)
    if what is not None:
        raise ConfigError(f"{path} is {what}; distrib writes the profiler's traces there. HINT: remove it, or pass another --run.dir.")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(path, exc) from None
    return path


def trace_name(rank: int, first: int, last: int) -> str:
    return f"rank{rank}.steps{first}-{last}"


class StepProfiler:
    """Traces optimizer steps `first`..`last` (both included) on this rank; `Session` drives it.

    `begin` runs as a step's first micro-batch is fetched (the ledger calls it), `end(step)` after the
    step's optimizer step, `close` at the session's end (a run that ends inside the window keeps what it traced).
    """

    def __init__(self, window: tuple[int, int], *, run_dir: str | Path, rank: int, device: torch.device, steps_done: Callable[[], int]) -> None:
        self.first, self.last = window
        self.run_dir, self.rank, self.device = Path(run_dir), rank, device
        # Before anything is written, on every rank: a planted link or file where the traces go is exit 2 now, not mid-run.
        check_own(profile_dir(run_dir, create=False) / f"{trace_name(rank, *window)}.pt.trace.json")
        if self.last - self.first >= 50 and rank == 0:
            log.warning(
                f"train.profile={self.first}:{self.last} traces {self.last - self.first + 1} steps: a trace grows by megabytes a step and is "
                "written when the window ends (a stop waits for it). HINT: a few steps show a step's time as well (--train.profile 20:25)."
            )
        self._steps_done = steps_done
        self._prof: Any = None
        self._mark: Any = None
        self.traced: list[int] = []
        """The steps traced so far (metrics.jsonl marks them)."""
        self._done = False
        self._logged_to = 0  # the step of the last train record `mark` saw

    def begin(self) -> None:
        step = self._steps_done() + 1
        if self._prof is None:
            if self._done or not self.first <= step <= self.last:
                return
            self._start(step)
        self._mark = torch.profiler.record_function(f"ProfilerStep#{step}")
        self._mark.__enter__()
        self.traced.append(step)

    def end(self, step: int) -> None:
        if self._mark is None:
            return
        self._mark.__exit__(None, None, None)
        self._mark = None
        if step >= self.last:
            self._stop()

    def close(self) -> None:
        if self._mark is not None:
            self._mark.__exit__(None, None, None)
            self._mark = None
        if self._prof is not None:
            self._stop()
        elif not self._done and self.rank == 0 and self._steps_done() < self.first:
            log.warning(f"train.profile={self.first}:{self.last}: the run ended at step {self._steps_done()}, before the window; nothing was traced")

    def mark(self, kind: str, step: int, record: dict[str, Any]) -> dict[str, Any]:
        """A train record with the traced steps of its interval, as `profiled: [5, 6]`; other records as they are."""
        if kind != "train":
            return record
        inside = [s for s in self.traced if self._logged_to < s <= step]
        self._logged_to = step
        return {**record, "profiled": inside} if inside else record

    def _start(self, step: int) -> None:
        self._dir = profile_dir(self.run_dir)
        for old in self._dir.glob(f".rank{self.rank}.steps*.tmp*"):  # this rank's own, from an attempt killed mid-export
            if old.is_file() and not old.is_symlink():
                old.unlink(missing_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")  # C++ frames: slow to name at the dump
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self._prof.start()
        if self.rank == 0:
            log.info(f"profile: tracing optimizer steps {step} to {self.last} (train.profile) into {self._dir}")

    def _stop(self) -> None:
        prof, self._prof, self._done = self._prof, None, True
        prof.stop()
        first, last = (self.traced[0], self.traced[-1]) if self.traced else (self.first, self.first)
        name = trace_name(self.rank, first, last)
        trace = self._dir / f"{name}.pt.trace.json"
        self._write(trace, prof.export_chrome_trace)
        if self.device.type == "cuda":
            self._write(self._dir / f"{name}.memory.pickle", torch.cuda.memory._dump_snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.rank == 0:
            log.info(f"profile: steps {first} to {last} traced: {self._dir}/rank*.steps{first}-{last}.pt.trace.json (open in ui.perfetto.dev)")

    @staticmethod
    def _write(path: Path, export: Callable[[str], Any]) -> None:
        """`export(name)` into a name of our own beside `path`, then renamed to it: never written through a planted link."""
        check_own(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            # Created here first, so a directory that refuses it says why (the exporter's own error is only logged).
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
            export(str(tmp))
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise storage_error(path, exc) from None


def oom_snapshot(run_dir: str | Path, rank: int) -> Path | None:
    """On a CUDA out-of-memory error: the allocator's state (and history, if it was being recorded) as run.dir/profile/rank<R>.oom.memory.pickle."""
    try:
        path = profile_dir(run_dir) / f"rank{rank}.oom.memory.pickle"
        StepProfiler._write(path, torch.cuda.memory._dump_snapshot)
    except Exception as exc:  # noqa: BLE001 - the OOM is the error to report; a snapshot that fails is a note
        log.warning(f"profile: no memory snapshot after the CUDA out-of-memory error ({exc})")
        return None
    log.error(f"profile: the CUDA memory at the out-of-memory error is in {path} (open it in pytorch.org/memory_viz)")
    return path
