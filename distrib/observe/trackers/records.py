"""What the trackers log from a metrics.jsonl record: its step and its numbers, named `kind/key`.

Shared by the trackers in this folder (imported as a top-level module: the worker runs as a script).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {"train/loss": 0.5, ...}): every number of the record but its step; not flags, lists or text."""
    kind = record.get("kind", "train")
    values = {f"{kind}/{k}": float(v) for k, v in record.items() if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return int(record.get("step", 0)), values


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 0.1, ...}: the config's sections as dotted keys (the command line's names)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def finite_numbers(summary: Any) -> dict[str, float]:
    """The summary's top-level finite numbers (steps, samples, the last eval's values), for a tracker's run summary."""
    if not isinstance(summary, dict):
        return {}
    out = {}
    for key, value in flat_config(summary).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def kept_records(run: Any) -> list[dict[str, Any]]:
    """On resume, the records of metrics.jsonl the checkpoint kept (distrib cut the file back to them before any
    tracker started): what a tracker that lagged behind the killed attempt may still be missing."""
    if run.resumed_step is None:
        return []
    out: list[dict[str, Any]] = []
    try:
        with open(Path(run.dir) / "metrics.jsonl", "rb") as f:
            for raw in f:
                if run.kept_records is not None and len(out) >= run.kept_records:
                    break
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict) and (run.kept_records is not None or record.get("step", 0) <= run.resumed_step):
                    out.append(record)
    except FileNotFoundError:
        pass
    return out
