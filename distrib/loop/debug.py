"""`--debug`: one process, in-process data loading (so breakpoint() works), anomaly detection and
deterministic kernels, a small step limit, and a run directory of its own."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from distrib.checkpoint.rundir import CONFIG_FILE
from distrib.config import Config, RunConfig
from distrib.errors import ConfigError

DEBUG_SUFFIX = "-debug"


def apply_debug(cfg: Config) -> Config:
    """Apply --debug: a small step limit, in-process data loading (so breakpoint() works), and a run
    directory of its own, so a debug run never rewrites a real run's summary, config or checkpoints."""
    if not cfg.debug:
        return cfg
    run_dir = cfg.run.dir
    if run_dir == RunConfig().dir:
        run_dir += DEBUG_SUFFIX  # runs/distrib-debug
    recorded = _recorded_config(Path(run_dir))
    if recorded is not None and not recorded.get("debug", False):
        raise ConfigError(
            f"--debug with run.dir={run_dir!r}, which holds a run that was not a debug run: a 10-step debug run would "
            f"rewrite its summary, config and checkpoints. HINT: pass --run.dir {run_dir.rstrip('/')}{DEBUG_SUFFIX} "
            "(or any new directory), or drop --debug to continue that run."
        )
    limit = min(cfg.train.max_steps or cfg.train.debug_steps, cfg.train.debug_steps)
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, dir=run_dir),
        data=dataclasses.replace(cfg.data, num_workers=0, persistent_workers=False, prefetch_factor=None),
        train=dataclasses.replace(cfg.train, max_steps=limit),
    )


def _recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The config.json a run left in `run_dir` (None: no run there, or not readable as one)."""
    try:
        recorded = json.loads((run_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


@contextlib.contextmanager
def debug_checks(device: torch.device) -> Iterator[None]:
    """Anomaly detection and deterministic kernels (slow, but a NaN or a race names its source).

    Both are process-global switches, so they are restored afterwards.
    """
    if device.type == "cuda":
        # cuBLAS needs this before its first call to be deterministic; debug mode is single-process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    anomaly, deterministic = torch.is_anomaly_enabled(), torch.are_deterministic_algorithms_enabled()
    torch.autograd.set_detect_anomaly(True)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.autograd.set_detect_anomaly(anomaly)
        torch.use_deterministic_algorithms(deterministic)
