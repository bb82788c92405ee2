"""`python -m distrib.train [--config FILE] [--debug] [--section.key value ...]` on the built-in task."""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch

from distrib.config import Config, parse_config
from distrib.data import steps_per_epoch
from distrib.errors import DistribError
from distrib.optim import build_optimizer, build_scheduler
from distrib.run import fit
from distrib.stop import EXIT_STOPPED
from distrib.task import make_datasets, make_model


def _total_steps(cfg: Config, train_size: int, world_size: int) -> int:
    per_rank = -(-train_size // world_size)
    micro = per_rank // cfg.train.batch_size if cfg.data.drop_last else -(-per_rank // cfg.train.batch_size)
    total = cfg.train.epochs * steps_per_epoch(micro, cfg.train.grad_accum)
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def run(cfg: Config, world_size: int | None = None) -> dict[str, Any]:
    """Build the built-in task from `cfg` and train it."""
    from distrib.env import detect

    world = 1 if cfg.debug else (world_size or detect().world_size)
    train_data, eval_data = make_datasets(cfg.task, train_size=cfg.data.train_size, eval_size=cfg.data.eval_size, seed=cfg.seed)
    model = make_model(cfg.task, seed=cfg.seed)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    total = _total_steps(cfg, cfg.data.train_size, world)
    if cfg.debug:
        total = min(total, cfg.train.debug_steps)
    scheduler = build_scheduler(cfg.optim, optimizer, total)
    # Forward + backward of an MLP: 2 FLOPs per multiply-add, 3 passes' worth (forward, two backward matmuls).
    flops = 6 * sum(p.numel() for p in model.parameters())
    return fit(cfg, model=model, optimizer=optimizer, scheduler=scheduler, train_data=train_data, eval_data=eval_data,
               loss_fn=torch.nn.functional.cross_entropy, flops_per_sample=flops)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        summary = run(cfg)
    except DistribError as exc:
        print(f"distrib: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return EXIT_STOPPED if summary["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
