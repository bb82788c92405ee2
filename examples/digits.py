"""A classifier on scikit-learn's bundled handwritten digits (no download), trained through `distrib.fit`.

    python examples/digits.py
    torchrun --nproc_per_node=2 examples/digits.py --train.epochs 20
    srun --ntasks=2 python examples/digits.py

examples/own_loop.py is the same training as your own loop on distrib's blocks: with the same
flags it ends at the same parameters.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import distrib


@dataclasses.dataclass(kw_only=True)
class DigitsConfig:
    """This script's own keys: `--digits.hidden 64 --digits.lr 0.1`."""

    hidden: int = 64
    """Width of the hidden layer."""
    lr: float = 0.1
    """SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    test_fraction: float = 0.25
    """Share of the 1797 digits held out for evaluation."""


DEFAULTS = {"train.epochs": 20, "train.batch_size": 32, "train.log_every": 10, "run.dir": "runs/digits"}


def datasets(cfg: DigitsConfig, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """8x8 grey-level digits scaled to [0, 1], split reproducibly from `seed` (the same on every rank)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * cfg.test_fraction)
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def make_model(cfg: DigitsConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))


def train(cfg: distrib.Config) -> dict:
    train_set, test_set = datasets(cfg.digits, cfg.seed)
    model = make_model(cfg.digits, cfg.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.digits.lr, momentum=cfg.digits.momentum)
    return distrib.fit(cfg, model=model, optimizer=optimizer, train_data=train_set, eval_data=test_set)


if __name__ == "__main__":
    sys.exit(distrib.main(train, sections={"digits": DigitsConfig}, defaults=DEFAULTS))
