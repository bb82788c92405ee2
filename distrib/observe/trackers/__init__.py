"""Where a run's metrics go besides metrics.jsonl (`run.report_to`): wandb, TensorBoard, MLflow, CSV, your own.

Rank 0 starts them in a process of their own (`process.py` starts `worker.py`), each on a thread of
its own there; the trackers are `*_tracker.py` in this folder, imported by the worker as top-level
modules (it runs as a script, without distrib or torch). A tracker of your own is a class with the
methods of `TrackerProtocol`, named as `--run.report_to mypkg.trackers:MyTracker` (docs/trackers.md).
"""

from __future__ import annotations

from typing import Any, Protocol

from distrib.observe.trackers.worker import TrackerRun


class TrackerProtocol(Protocol):
    """A tracker: constructed without arguments in the trackers' process, then called on its own thread there.

    `log` is required; `start` and `finish` are called when present. An exception from any of them
    is one warning, and the tracker is off for the rest of the run; a call that hangs holds up no
    step and no other tracker, and is abandoned `run.tracker_timeout_s` after training ends.
    """

    def start(self, run: TrackerRun) -> None:
        """Open the run (`run.resumed_step` is set when a resume continues one: records after it may come again)."""

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record, as written: {"kind": "train", "step": 8, "loss": 0.41, ...} (or `eval`, ...)."""

    def finish(self, summary: dict[str, Any] | None, outcome: str) -> None:
        """The run's end: summary.json's content if it was written, and `finished`, `stopped` or `failed`."""


__all__ = ["TrackerProtocol", "TrackerRun"]
