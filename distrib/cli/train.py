"""`python -m distrib.train [--config FILE] [--debug] [--section.key value ...]` on the built-in task.

A script like any user's: its own sections (`distrib.cli.task.SECTIONS`), a model and data, `fit`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, cast

from distrib.cli.task import SECTIONS, TaskConfig, TaskDataConfig, make_datasets, make_model
from distrib.config import Config
from distrib.loop.fit import fit
from distrib.loop.fit import main as script_main
from distrib.runtime import shutdown


def run(cfg: Config) -> dict[str, Any]:
    """Build the built-in task from `cfg` and train it (the optimizer and schedule come from `optim.*`)."""
    # The sections SECTIONS adds, typed (config_class makes the class at run time, where a checker cannot see them).
    task, data = cast(TaskConfig, getattr(cfg, "task")), cast(TaskDataConfig, cfg.data)  # noqa: B009
    train_data, eval_data = make_datasets(task, train_size=data.train_size, eval_size=data.eval_size, seed=cfg.seed)
    model = make_model(task, seed=cfg.seed)
    # Forward + backward of an MLP: 2 FLOPs per multiply-add, 3 passes' worth (forward, two backward matmuls).
    flops = 6 * sum(p.numel() for p in model.parameters())
    return fit(cfg, model=model, train_data=train_data, eval_data=eval_data, flops_per_sample=flops)


def main(argv: Sequence[str] | None = None) -> int:
    return script_main(run, sections=SECTIONS, argv=argv)


command = shutdown.command(main)  # the console script and `python -m`


if __name__ == "__main__":
    sys.exit(command())
