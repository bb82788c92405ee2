"""The loaders a run's config asks for: what `Session.train_loader` and `Session.eval_loader` return.

`train.batch_size`, `train.eval_batch_size`, `train.grad_accum` (or `train.global_batch_size`, split
over this world size by `split.py`) and `train.max_steps`, the `data.*` keys and `seed` go in here; an
argument given to the session's call wins over its key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from distrib.config import Config
from distrib.data.accumulate import ItemCounter
from distrib.data.loaders import EvalLoader, LoaderOptions, TrainLoader
from distrib.data.split import BatchSplit, small_micro_batch_note, split_global_batch
from distrib.errors import ConfigError
from distrib.runtime.console import log
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
    split = batch_split(cfg, rt.world_size, batch_size=batch_size, grad_accum=grad_accum)
    if split is not None:
        batch_size, grad_accum = split.micro_batch, split.grad_accum
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


def batch_split(cfg: Config, world_size: int, *, batch_size: int | None = None, grad_accum: int | None = None) -> BatchSplit | None:
    """`train.global_batch_size` split over `world_size` (logged), or None when it is unset."""
    tc = cfg.train
    if tc.global_batch_size is None:
        return None
    if grad_accum is not None:
        raise ConfigError(
            f"train_loader(grad_accum={grad_accum}) with train.global_batch_size={tc.global_batch_size}: the global batch "
            "sets the accumulation for the world size. HINT: drop grad_accum=, or unset train.global_batch_size."
        )
    cap = batch_size or tc.batch_size
    split = split_global_batch(tc.global_batch_size, max_micro_batch=cap, world_size=world_size)
    if cfg.dist.static_graph and cfg.dist.strategy == "ddp" and split.grad_accum > 1:
        raise ConfigError(
            f"dist.static_graph=true, and train.global_batch_size={tc.global_batch_size} takes {split.grad_accum} micro-batches "
            f"per step on {world_size} processes (train.batch_size={cap}): DDP's static graph cannot skip the all-reduce of an "
            "accumulating micro-batch. HINT: drop --dist.static_graph, or raise --train.batch_size to "
            f"{tc.global_batch_size // world_size}."
        )
    log.info(f"{split.describe()} (train.global_batch_size; train.batch_size={cap} caps the micro-batch)")
    note = small_micro_batch_note(split, cap)
    if note:
        log.warning(note)
    return split


def build_eval_loader(
    cfg: Config, rt: Runtime, dataset: Dataset, *, even: bool, batch_size: int | None = None, collate_fn: Callable[[list[Any]], Any] | None = None
) -> EvalLoader:
    """`even`: every rank runs as many forwards (FSDP: each forward gathers parameters from every rank)."""
    tc = cfg.train
    opts = LoaderOptions.of(cfg.data, batch_size=batch_size or tc.eval_batch_size or tc.batch_size, collate_fn=collate_fn, device=rt.device)
    return EvalLoader(dataset, world_size=rt.world_size, rank=rt.rank, opts=opts, device=rt.device, prefetch=cfg.data.prefetch, even=even)
