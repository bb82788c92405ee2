"""The built-in task: a learnable classification problem generated from the seed, no downloads.

Inputs are Gaussian; labels are the argmax of a fixed random linear "teacher" network, so the
problem is learnable (an MLP reaches >0.9 accuracy) and far above chance (1/classes) only if it learns.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from distrib.config import TaskConfig

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
