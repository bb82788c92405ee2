"""The one workload every framework in the benchmark runs: same model, data, batch, steps and seed.

Each runner script builds these, hands the framework a *timed* optimizer (its `step` records a
timestamp; the frameworks' optimizer wrappers call it once per optimizer step), trains, and rank 0
writes one JSON line of results. Steps/s is measured between the end of the warm-up and the last
step, so process start, imports and rendezvous are excluded; the driver times the whole process too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="per process, per micro-batch")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--sample_cost", type=int, default=0, help="extra work per __getitem__ (matmuls of a 32x32 matrix)")
    p.add_argument("--warmup", type=int, default=10, help="optimizer steps before the clock starts")
    p.add_argument("--steps", type=int, default=100, help="timed optimizer steps")
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sync_every_micro", action="store_true", help="hand loop only: all-reduce on every micro-batch (no no_sync)")
    p.add_argument("--distrib_set", action="append", default=[], metavar="KEY=VALUE", help="distrib only: a config override (e.g. dist.bucket_cap_mb=25)")
    p.add_argument("--out", default=os.environ.get("BENCH_RESULT", ""))
    return p.parse_args(argv)


class Synthetic(Dataset):
    """Gaussian inputs with labels from a fixed linear teacher; optionally costly per sample."""

    def __init__(self, n: int, dim: int, classes: int, seed: int, sample_cost: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = (self.x @ torch.randn(dim, classes, generator=g)).argmax(dim=1)
        self.cost = sample_cost
        self.work = torch.randn(32, 32, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.work
        for _ in range(self.cost):  # a decode/augment stand-in: real CPU work in the loader
            w = torch.tanh(w @ self.work)
        return self.x[i], self.y[i]


def model(args: argparse.Namespace, classes: int = 10) -> nn.Module:
    torch.manual_seed(args.seed)
    layers: list[nn.Module] = []
    width = args.dim
    for _ in range(args.depth):
        layers += [nn.Linear(width, args.hidden), nn.ReLU()]
        width = args.hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def dataset(args: argparse.Namespace, world_size: int) -> Synthetic:
    # Enough samples for warm-up + timed steps in one epoch on every rank.
    n = (args.warmup + args.steps + 2) * args.batch * args.accum * world_size
    return Synthetic(n, args.dim, 10, args.seed, args.sample_cost)


class StepClock:
    """Timestamps of optimizer steps; wraps `optimizer.step` in place."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.times: list[float] = []
        self.first_wall = float("nan")
        """Wall-clock time (time.time) of the first optimizer step: comparable across processes."""
        inner = optimizer.step

        def step(*a: Any, **k: Any) -> Any:
            out = inner(*a, **k)
            if not self.times:
                self.first_wall = time.time()
            self.times.append(time.perf_counter())
            return out

        optimizer.step = step  # type: ignore[method-assign]

    def steps_per_s(self, warmup: int) -> float:
        t = self.times[warmup - 1 :]
        return (len(t) - 1) / (t[-1] - t[0])


def report(framework: str, args: argparse.Namespace, clock: StepClock, rank: int, world_size: int, loss: float | None = None) -> None:
    if rank != 0 or not args.out:
        return
    record = {
        "framework": framework,
        "world_size": world_size,
        "steps": len(clock.times),
        "steps_per_s": clock.steps_per_s(args.warmup),
        "loss": loss,
        "distrib_set": args.distrib_set,  # the config overrides the runner received (bench/ab.py variants)
    }
    with open(Path(args.out), "a") as f:
        f.write(json.dumps(record) + "\n")


def setup_threads() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@contextlib.contextmanager
def shared_run_dir() -> Iterator[str]:
    """A fresh run.dir every rank of this launch shares (a checkpoint's files come from every rank), removed after.

    torchrun gives all ranks of a launch one TORCHELASTIC_RUN_ID; a plain process uses its pid.
    """
    path = os.path.join(tempfile.gettempdir(), f"distrib-bench-{os.environ.get('TORCHELASTIC_RUN_ID', os.getpid())}")
    try:
        yield path
    finally:
        if os.environ.get("RANK", "0") == "0":
            shutil.rmtree(path, ignore_errors=True)
