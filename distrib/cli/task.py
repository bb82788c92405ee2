"""The built-in task: a learnable classification problem generated from the seed, no downloads.

Inputs are Gaussian; labels are the argmax of a fixed random linear "teacher" network, so the
problem is learnable (an MLP reaches >0.9 accuracy) and far above chance (1/classes) only if it learns.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.data import TensorDataset

from distrib.config import DataConfig, OptimConfig
from distrib.config.checks import positive
from distrib.errors import ConfigError


@dataclasses.dataclass(kw_only=True)
class TaskConfig:
    """The built-in task's model shape (`python -m distrib.train` only; scripts bring their own)."""

    dim: int = 32
    """Input features of the built-in task."""
    hidden: int = 128
    """Width of each hidden layer of the MLP."""
    depth: int = 2
    """Number of hidden layers."""
    classes: int = 8
    """Number of classes (chance accuracy is 1/classes)."""
    dropout: float = 0.0
    """Dropout after each hidden layer."""

    def __post_init__(self) -> None:
        positive("task", dim=self.dim, hidden=self.hidden, depth=self.depth)
        if self.classes < 2:
            raise ConfigError(f"task.classes={self.classes} must be >= 2. HINT: pass --task.classes 2 or more.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"task.dropout={self.dropout} must be in [0, 1). HINT: pass --task.dropout 0.1.")


@dataclasses.dataclass(kw_only=True)
class TaskDataConfig(DataConfig):
    """distrib's data keys plus the built-in task's dataset sizes."""

    train_size: int = 16384
    """Samples in the built-in task's training set."""
    eval_size: int = 2048
    """Samples in the built-in task's evaluation set."""

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("data", train_size=self.train_size, eval_size=self.eval_size)


SECTIONS = {"task": TaskConfig, "data": TaskDataConfig, "optim": OptimConfig}
"""The built-in task's config sections: its model, its dataset sizes, and an optimizer built from config."""


def _teacher(cfg: TaskConfig, g: torch.Generator) -> nn.Module:
    # A one-layer teacher without bias: classes are cones through the origin, roughly balanced,
    # and an MLP student learns them to >0.9 accuracy in a few epochs (tanh teachers plateau ~0.8).
    teacher = nn.Linear(cfg.dim, cfg.classes, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(cfg.classes, cfg.dim, generator=g))
    return teacher


def make_datasets(cfg: TaskConfig, *, train_size: int, eval_size: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, eval) datasets of (float32 inputs [dim], int64 label); identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    teacher = _teacher(cfg, g)
    x = torch.randn(train_size + eval_size, cfg.dim, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)
    return TensorDataset(x[:train_size], y[:train_size]), TensorDataset(x[train_size:], y[train_size:])


def make_model(cfg: TaskConfig, *, seed: int) -> nn.Module:
    """MLP dim -> hidden x depth -> classes with ReLU and optional dropout; same init on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = cfg.dim
        for _ in range(cfg.depth):
            layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = cfg.hidden
        layers.append(nn.Linear(width, cfg.classes))
        return nn.Sequential(*layers)
