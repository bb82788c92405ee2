"""The library entry point: `fit()` runs a user's model and data under whatever launcher started us.

Lifecycle: prepare config -> init distributed -> build trainer -> fit -> close. Teardown (writer
close, destroy_process_group) happens on success and on error.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from distrib.config import Config
from distrib.dist import distributed
from distrib.logs import log, setup_console
from distrib.loop import Trainer


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


def _debug_checks(device: torch.device) -> None:
    """Anomaly detection and deterministic kernels: slow, but a NaN or a race names its source."""
    if device.type == "cuda":
        # cuBLAS needs this before its first call to be deterministic; debug mode is single-process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.autograd.set_detect_anomaly(True)
    torch.use_deterministic_algorithms(True)


def fit(cfg: Config, **trainer_args: Any) -> dict[str, Any]:
    """Train `model` on `train_data` (see `Trainer` for the arguments) and return the summary.

    Runs unchanged under `python`, `torchrun` and `srun`: the launcher is detected from the environment.
    """
    cfg = prepare(cfg)
    with distributed(device=cfg.run.device, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s, single=cfg.debug) as rt:
        setup_console(rt.rank, rt.world_size)
        if cfg.debug:
            _debug_checks(rt.device)
            log.info(f"debug mode: 1 process on {rt.device}, no process group, num_workers=0, max_steps={cfg.train.max_steps}")
        trainer = Trainer(cfg, rt, **trainer_args)
        try:
            return trainer.fit()
        finally:
            trainer.close()
