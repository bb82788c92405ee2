"""A tracker of your own: `--run.report_to csv,examples.my_tracker:LossFile` (any `module:Class` on the Python path).

distrib constructs the class in its trackers' process on rank 0, calls `start(run)` once, `log(record)`
with each record metrics.jsonl gets, and `finish(summary, outcome)` at the end; each on a thread of
its own, so a slow call holds up no training step. An exception turns the tracker off with one warning.
This one keeps `run.dir/losses.txt`: one `step loss` line per train record, as gnuplot reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class LossFile:
    def start(self, run: Any) -> None:
        self.path = Path(run.dir) / "losses.txt"
        kept = []
        if run.resumed_step is not None and self.path.exists():  # a resume: keep what came before its checkpoint
            kept = [line for line in self.path.read_text().splitlines(keepends=True) if int(line.split()[0]) <= run.resumed_step]
        self.path.write_text("".join(kept))

    def log(self, record: dict[str, Any]) -> None:
        if record["kind"] == "train":
            with self.path.open("a") as f:
                f.write(f"{record['step']} {record['loss']!r}\n")

    def finish(self, summary: dict[str, Any] | None, outcome: str) -> None:
        print(f"losses.txt: {self.path} ({outcome})", flush=True)
