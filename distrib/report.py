"""`distrib report RUN_DIR`: curves and a short summary from metrics.jsonl alone.

Works for offline runs and finished or killed jobs: nothing but the file rank 0 appends to.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence


def load(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. HINT: pass the run.dir of a distrib run.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(records: list[dict[str, Any]]) -> list[str]:
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    lines = [f"{len(train)} train intervals, {len(evals)} evals, last step {train[-1]['step'] if train else 0}"]
    if train:
        lines.append(f"train loss {train[0]['loss']:.4f} -> {train[-1]['loss']:.4f}")
        lines.append(f"throughput median {statistics.median(r['samples_per_s'] for r in train):.0f} samples/s")
        waits = [r["data_wait_frac"] for r in train if "data_wait_frac" in r]
        if waits:
            lines.append(f"data wait median {statistics.median(waits):.1%}, max {max(waits):.1%}")
        stragglers = sorted({r["straggler"] for r in train if "straggler" in r})
        lines.append(f"stragglers: {', '.join(f'rank {s}' for s in stragglers) if stragglers else 'none'}")
    if evals:
        e = evals[-1]
        lines.append(f"eval at step {e['step']}: loss {e['loss']:.4f}, accuracy {e['accuracy']:.4f} over {e['count']} samples")
    return lines


def plot(records: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    fig.suptitle(title)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    ax.set(title="loss", xlabel="step")
    ax.legend()
    panels = ((axes[0][1], "lr", "learning rate"), (axes[1][0], "samples_per_s", "throughput (samples/s)"),
              (axes[1][1], "data_wait_frac", "data wait (share of interval)"))
    for ax, key, name in panels:
        points = [(r["step"], r[key]) for r in train if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set(title=name, xlabel="step")
    axes[1][1].set_ylim(0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distrib report", description="Plot a run's metrics.jsonl to a PNG and print a summary.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="PNG path (default: RUN_DIR/report.png)")
    ns = p.parse_args(argv)
    try:
        records = load(ns.run_dir)
    except FileNotFoundError as exc:
        print(f"distrib: error: {exc}", file=sys.stderr)
        return 2
    out = ns.out or ns.run_dir / "report.png"
    plot(records, out, title=str(ns.run_dir))
    print("\n".join(summarize(records)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
