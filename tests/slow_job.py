"""A job whose input pipeline is slow on purpose, for the observability tests (run under torchrun).

SLOW_RANK: the rank whose samples are slow (-1 none, -2 every rank); SLOW_MS: delay per sample;
SLEEP_AT / SLEEP_S: that rank also sleeps SLEEP_S seconds on its SLEEP_AT-th sample (a "hang").
SLOW_EVAL_MS: delay per eval sample on every rank; EVAL_MARKER: a file created when the eval starts.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import distrib
from distrib.cli.task import TaskConfig, TaskDataConfig, make_datasets, make_model


class SlowDataset(torch.utils.data.Dataset):
    def __init__(self, base: torch.utils.data.Dataset) -> None:
        self.base = base
        self.rank = int(os.environ.get("RANK", "0"))
        slow = int(os.environ.get("SLOW_RANK", "-1"))
        self.slow = slow == -2 or slow == self.rank
        self.delay = float(os.environ.get("SLOW_MS", "0")) / 1000
        self.sleep_at, self.sleep_s = int(os.environ.get("SLEEP_AT", "-1")), float(os.environ.get("SLEEP_S", "0"))
        self.calls = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if self.slow:
            time.sleep(self.delay)
            self.calls += 1
            if self.calls == self.sleep_at:
                time.sleep(self.sleep_s)
        return self.base[i]


class SlowEval(torch.utils.data.Dataset):
    def __init__(self, base: torch.utils.data.Dataset) -> None:
        self.base = base
        self.delay = float(os.environ.get("SLOW_EVAL_MS", "0")) / 1000
        self.marker = os.environ.get("EVAL_MARKER")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if self.marker:
            open(self.marker, "a").close()
        time.sleep(self.delay)
        return self.base[i]


def main() -> int:
    torch.set_num_threads(1)
    cfg = distrib.parse_config(sys.argv[1:], sections={"task": TaskConfig, "data": TaskDataConfig})
    train, evaluation = make_datasets(cfg.task, train_size=cfg.data.train_size, eval_size=cfg.data.eval_size, seed=cfg.seed)
    model = make_model(cfg.task, seed=cfg.seed)
    distrib.fit(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_data=SlowDataset(train), eval_data=SlowEval(evaluation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
