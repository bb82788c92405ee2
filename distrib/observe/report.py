"""`distrib report RUN_DIR`: curves and a short summary from metrics.jsonl alone.

Works for offline runs and finished or killed jobs: nothing but the file rank 0 appends to.
"""

from __future__ import annotations

import io
import statistics
import sys
from pathlib import Path
from typing import Any

from distrib.checkpoint.fileio import storage_error, write_atomic
from distrib.checkpoint.rundir import METRICS_FILE


def load(run_dir: Path) -> list[dict[str, Any]]:
    """The run's records; a torn or garbled line (a crash mid-write) is skipped with a warning."""
    from distrib.observe.run_files import read_lines

    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. HINT: pass the run.dir of a distrib run.")
    lines = read_lines(path)
    bad = sum(r is None for r in lines)
    if bad:
        print(f"distrib: warning: {path}: skipped {bad} torn or unreadable line(s)", file=sys.stderr)
    return [r for r in lines if r is not None and isinstance(r.get("step"), (int, float))]


def _num(r: dict[str, Any], key: str) -> float | None:
    v = r.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def summarize(records: list[dict[str, Any]]) -> list[str]:
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    lines = [f"{len(train)} train intervals, {len(evals)} evals, last step {train[-1]['step'] if train else 0}"]
    losses = [v for r in train if (v := _num(r, "loss")) is not None]
    if losses:
        lines.append(f"train loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    rates = [v for r in train if (v := _num(r, "samples_per_s")) is not None]
    if rates:
        lines.append(f"throughput median {statistics.median(rates):.0f} samples/s")
    waits = [v for r in train if (v := _num(r, "data_wait_frac")) is not None]
    if waits:
        lines.append(f"data wait median {statistics.median(waits):.1%}, max {max(waits):.1%}")
    if train:
        stragglers = sorted({r["straggler"] for r in train if isinstance(r.get("straggler"), int)})
        lines.append(f"stragglers: {', '.join(f'rank {s}' for s in stragglers) if stragglers else 'none'}")
    if evals:
        e = evals[-1]
        shown = ", ".join(f"{k} {v:.4f}" for k in ("loss", "accuracy", "perplexity") if (v := _num(e, k)) is not None)
        lines.append(f"eval at step {e['step']}: {shown or 'no metrics'} over {e.get('count', '?')} samples")
    return lines


def plot(records: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    # Records without a kind or a step (hand-edited, or another tool's) are not plotted.
    train = [r for r in records if r.get("kind") == "train" and _num(r, "step") is not None]
    evals = [r for r in records if r.get("kind") == "eval" and _num(r, "step") is not None]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    fig.suptitle(title)
    ax = axes[0][0]
    points = [(r["step"], v) for r in train if (v := _num(r, "loss")) is not None]
    ax.plot([p[0] for p in points], [p[1] for p in points], label="train")
    points = [(r["step"], v) for r in evals if (v := _num(r, "loss")) is not None]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="eval")
    ax.set(title="loss", xlabel="step")
    ax.legend()
    panels = (
        (axes[0][1], "lr", "learning rate"),
        (axes[1][0], "samples_per_s", "throughput (samples/s)"),
        (axes[1][1], "data_wait_frac", "data wait (share of interval)"),
    )
    for ax, key, name in panels:
        points = [(r["step"], v) for r in train if (v := _num(r, key)) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set(title=name, xlabel="step")
    axes[1][1].set_ylim(0, 1)
    image = io.BytesIO()
    fig.savefig(image, dpi=100, format=out.suffix.lower()[1:])
    plt.close(fig)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(out.parent, exc) from None
    write_atomic(out, image.getvalue())  # never through a planted link, never half a file
