"""Rank-0 effects behind one switch: the real writer on rank 0, a null one elsewhere.

Other ranks print only warnings and errors, prefixed with their rank, so a Slurm log never shows
eight copies of every line.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from distrib.fileio import save_torch, write_atomic

log = logging.getLogger("distrib")

STOPPED_FILE = "stopped.json"
"""Written by rank 0 when a run stops on a signal with a checkpoint (the Slurm epilogue requeues on it)."""


def setup_console(rank: int, world_size: int) -> None:
    """Rank 0 logs INFO; other ranks WARNING and up, each line prefixed with the rank."""
    prefix = f"[rank{rank}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


class RunWriter:
    """Rank 0's files in run.dir: metrics.jsonl, config.json, summary.json."""

    def __init__(self, run_dir: str | Path, *, fresh: bool, tracker: Any = None) -> None:
        self.dir = Path(run_dir)
        self.tracker = tracker  # distrib.tracking.Tracker: wandb on rank 0, or None
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / STOPPED_FILE).unlink(missing_ok=True)  # this run is under way again
        # A fresh run starts a new metrics file; a resumed one appends to its own history.
        self._metrics = open(self.dir / "metrics.jsonl", "w" if fresh else "a", buffering=1)

    def metrics(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)

    def rewind(self, *, step: int, epoch: int) -> None:
        """On resume, drop lines the interrupted run logged after its checkpoint (they will be logged again)."""
        self._metrics.close()
        path = self.dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        keep = [
            line for line in lines
            if (r := json.loads(line))["kind"] != "eval" and r["step"] <= step or r["kind"] == "eval" and r["epoch"] < epoch
        ]
        write_atomic(path, "".join(line + "\n" for line in keep).encode())
        self._metrics = open(path, "a", buffering=1)

    def json(self, name: str, obj: Any) -> None:
        write_atomic(self.dir / name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def save_model(self, state_dict: dict[str, Any]) -> None:
        """model.pt: the plain state_dict (no `module.` prefixes), written atomically."""
        save_torch(self.dir / "model.pt", state_dict)

    def close(self) -> None:
        self._metrics.close()
        if self.tracker is not None:
            self.tracker.finish()


class NullWriter(RunWriter):
    """What every rank but 0 gets: the same interface, no effects."""

    def __init__(self) -> None:  # noqa: D107 - deliberately skips the parent's file creation
        self.tracker = None

    def metrics(self, record: dict[str, Any]) -> None:
        pass

    def json(self, name: str, obj: Any) -> None:
        pass

    def rewind(self, *, step: int, epoch: int) -> None:
        pass

    def save_model(self, state_dict: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def writer_for(rank: int, run_dir: str | Path, *, fresh: bool, tracker: Any = None) -> RunWriter:
    return RunWriter(run_dir, fresh=fresh, tracker=tracker) if rank == 0 else NullWriter()
