"""The built-in task, recording which samples every optimizer step trained on (for the elastic tests, under torchrun).

Each sample carries its id; the step function keeps the ids of the micro-batches it trains on, and at
every checkpoint (every epoch ends with one) rank r appends them to run.dir/ids/rank<r>-<pid>.jsonl as
`{"epoch": e, "ids": [...]}`: only work a checkpoint holds is written (with --ckpt.async false), so the
files of every process of a run, stopped and resumed however, list each sample it trained on.

STREAM=1 serves the training set as a stream (an IterableDataset with a len(), read in order);
SLOW_MS delays every training sample (so a signal finds the run mid-way).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import distrib
from distrib.cli.task import SECTIONS, make_datasets, make_model


class WithIds(torch.utils.data.Dataset):
    def __init__(self, base: torch.utils.data.Dataset, delay: float = 0.0) -> None:
        self.base, self.delay = base, delay

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        time.sleep(self.delay)
        x, y = self.base[i]
        return x, y, i


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, base: WithIds) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        return (self.base[i] for i in range(len(self.base)))


class Recorder(distrib.Callback):
    def __init__(self) -> None:
        self.pending: list[int] = []

    def step_fn(self, model, batch):
        x, y, ids = batch
        if model.training and torch.is_grad_enabled():  # not the pre-flight probe, nor eval
            self.pending += ids.tolist()
        return F.cross_entropy(model(x), y)

    def on_checkpoint(self, trainer, step: int) -> None:
        if self.pending:
            path = Path(trainer.cfg.run.dir) / "ids" / f"rank{trainer.session.rank}-{os.getpid()}.jsonl"
            path.parent.mkdir(exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({"epoch": trainer.train.current_epoch, "step": step, "ids": self.pending}) + "\n")
            self.pending = []


def train(cfg: distrib.Config) -> dict:
    torch.set_num_threads(1)
    train_set, evaluation = make_datasets(cfg.task, train_size=cfg.data.train_size, eval_size=cfg.data.eval_size, seed=cfg.seed)
    data = WithIds(train_set, float(os.environ.get("SLOW_MS", "0")) / 1000)
    recorder = Recorder()
    return distrib.fit(
        cfg,
        model=make_model(cfg.task, seed=cfg.seed),
        train_data=Stream(data) if os.environ.get("STREAM") == "1" else data,
        eval_data=WithIds(evaluation),
        step_fn=recorder.step_fn,
        callbacks=[recorder],
    )


if __name__ == "__main__":
    sys.exit(distrib.main(train, sections=SECTIONS))  # distrib's exits: 75 after a stop, 1 with `distrib: error:` on a fault
