"""Optimizer and LR schedule from config (the CLI's; library users may bring their own)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from distrib.config import OptimConfig
from distrib.errors import ConfigError


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_optimizer_for(cfg: OptimConfig | None, model: nn.Module, given: torch.optim.Optimizer | None) -> tuple[torch.optim.Optimizer, bool]:
    """fit's optimizer: the one `given`, or one built from the config's `optim` section; True when built."""
    if given is not None and cfg is not None:
        raise ConfigError(
            "An optimizer was passed to fit, and the config has an `optim` section too, whose keys would be ignored. "
            "HINT: drop optimizer= to build it from --optim.* , or drop the optim section from your script's sections."
        )
    if given is not None:
        return given, False
    if cfg is None:
        raise ConfigError(
            "fit needs an optimizer. HINT: pass optimizer=torch.optim.AdamW(model.parameters()), or add distrib.OptimConfig as the `optim` section."
        )
    return build_optimizer(cfg, model.parameters()), True


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, cosine or linear decay to 0 at `total_steps` (optimizer steps)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
