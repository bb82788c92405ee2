"""The library entry point: `fit()` runs a user's model and data under whatever launcher started us.

Lifecycle: prepare config -> init distributed -> build trainer -> fit -> close. Teardown (writer
close, destroy_process_group) happens on success and on error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator

import torch

from distrib.config import Config
from distrib.dist import distributed
from distrib.logs import log, setup_console
from distrib.loop import Trainer
from distrib.stop import stop_on_signals


def prepare(cfg: Config) -> Config:
    """Apply --debug: a small step limit and in-process data loading (so breakpoint() works)."""
    if not cfg.debug:
        return cfg
    limit = min(cfg.train.max_steps or cfg.train.debug_steps, cfg.train.debug_steps)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, num_workers=0, persistent_workers=False, prefetch_factor=None),
        train=dataclasses.replace(cfg.train, max_steps=limit),
    )


@contextlib.contextmanager
def _debug_checks(device: torch.device) -> Iterator[None]:
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


def fit(cfg: Config, **trainer_args: Any) -> dict[str, Any]:
    """Train `model` on `train_data` (see `Trainer` for the arguments) and return the summary.

    Runs unchanged under `python`, `torchrun` and `srun`: the launcher is detected from the environment.
    """
    cfg = prepare(cfg)
    with distributed(device=cfg.run.device, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s, single=cfg.debug) as rt:
        setup_console(rt.rank, rt.world_size)
        with _debug_checks(rt.device) if cfg.debug else contextlib.nullcontext():
            if cfg.debug:
                log.info(f"debug mode: 1 process on {rt.device}, no process group, num_workers=0, max_steps={cfg.train.max_steps}")
            trainer = Trainer(cfg, rt, **trainer_args)
            try:
                with stop_on_signals(trainer.stop):
                    return trainer.fit()
            finally:
                trainer.close()
