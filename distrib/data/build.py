"""The loaders a run's config asks for: what `Session.train_loader` and `Session.eval_loader` return.

`train.batch_size`, `train.eval_batch_size`, `train.grad_accum` and `train.max_steps`, the `data.*`
keys and `seed` go in here; an argument given to the session's call wins over its key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from distrib.config import Config
from distrib.data.accumulate import ItemCounter
from distrib.data.loaders import EvalLoader, LoaderOptions, TrainLoader
from distrib.runtime.group import Runtime


def build_train_loader(
    cfg: Config,
    rt: Runtime,
    dataset: Dataset,
    *,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    items: ItemCounter | None = None,
) -> TrainLoader:
    tc, dc = cfg.train, cfg.data
    opts = LoaderOptions.of(dc, batch_size=batch_size or tc.batch_size, collate_fn=collate_fn, device=rt.device)
    return TrainLoader(
        dataset,
        world_size=rt.world_size,
        rank=rt.rank,
        seed=cfg.seed,
        shuffle=dc.shuffle,
        drop_last=dc.drop_last,
        opts=opts,
        device=rt.device,
        prefetch=dc.prefetch,
        grad_accum=grad_accum or tc.grad_accum,
        items=items,
        max_steps=tc.max_steps,
    )


def build_eval_loader(
    cfg: Config, rt: Runtime, dataset: Dataset, *, even: bool, batch_size: int | None = None, collate_fn: Callable[[list[Any]], Any] | None = None
) -> EvalLoader:
    """`even`: every rank runs as many forwards (FSDP: each forward gathers parameters from every rank)."""
    tc = cfg.train
    opts = LoaderOptions.of(cfg.data, batch_size=batch_size or tc.eval_batch_size or tc.batch_size, collate_fn=collate_fn, device=rt.device)
    return EvalLoader(dataset, world_size=rt.world_size, rank=rt.rank, opts=opts, device=rt.device, prefetch=cfg.data.prefetch, even=even)
