"""`distrib report RUN_DIR`: plot a run's metrics.jsonl (`distrib/observe/report.py`) and print a summary."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from distrib.checkpoint.rundir import METRICS_FILE
from distrib.errors import CommandParser, DistribError, error_exit
from distrib.observe.report import load, plot, summarize


def main(argv: Sequence[str] | None = None) -> int:
    p = CommandParser(prog="distrib report", description="Plot a run's metrics.jsonl to a PNG and print a summary.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="PNG, PDF or SVG path, or a directory for report.png (default: RUN_DIR/report.png)")
    ns = p.parse_args(argv)
    try:
        records = load(ns.run_dir)
    except FileNotFoundError as exc:
        return error_exit(str(exc))
    if not records:
        return error_exit(
            f"{ns.run_dir / METRICS_FILE} holds no metrics yet (a run writes its first line at step train.log_every), so there is nothing "
            "to plot and nothing was written. HINT: run `distrib report` again once the run has logged."
        )
    out = ns.out or ns.run_dir / "report.png"
    if out.is_dir() or not out.suffix:  # a directory, or a path that names one: report.png inside
        out = out / "report.png"
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        return error_exit(f"--out {str(out)!r}: the plot is written as PNG, PDF or SVG. HINT: end the path with .png.")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:  # bad input, not a failing disk: say so before plotting
        return error_exit(f"cannot write the plot to {str(out)!r}: {str(blocker)!r} is a file, not a directory. HINT: pass --out a writable .png path.")
    try:
        plot(records, out, title=str(ns.run_dir))
    except DistribError as exc:
        return error_exit(exc)
    print("\n".join(summarize(records)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
