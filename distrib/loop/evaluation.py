"""The eval loop: every eval sample counted once over the ranks, with exact global means.

`EvalLoader` gives each rank a strided share with no padding; the metrics are sums and counts
all-reduced once at the end. Under FSDP the ranks with one batch fewer run filler forwards, so
every rank joins each forward's parameter gather.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distrib.data.accumulate import ItemCounter
from distrib.data.loaders import EvalLoader
from distrib.data.transfer import leading_dim
from distrib.loop.loss import LossStep
from distrib.observe.metrics import Metrics
from distrib.runtime.ledger import EVALUATING, LEDGER

if TYPE_CHECKING:
    from distrib.loop.session import Session


@torch.no_grad()
def evaluate_batches(
    session: Session, module: nn.Module, loader: EvalLoader, step: LossStep, items: ItemCounter | None, *, yield_to_stop: bool
) -> dict[str, Any] | None:
    """`module`'s global metrics over `loader` (`Metrics.compute`: means, and `samples`), in eval mode.

    With `yield_to_stop`, None as soon as the ranks agree on a stop, checked before each batch every
    rank has: an eval can outlast a launcher's grace period (torchrun SIGKILLs 30 s after its
    signal), so it gives way. The check is one scalar all-reduce per batch, none in one process.
    """
    module.eval()
    metrics = Metrics(session.device)
    batch: Any = None
    counted: Any = None
    try:
        for i, batch in enumerate(loader):
            if yield_to_stop and i < loader.common_batches and session.should_stop():
                return None
            LEDGER.at(EVALUATING, i)
            n = leading_dim(batch)
            counted = items(batch) if items is not None else None
            with session.autocast():
                out = step(module, batch, counted)
            # With num_items the batch's own count, a normalised loss is this batch's mean too.
            metrics.add(out.metrics, weight=n if counted is None else counted)
            metrics.add_total("samples", n)
        for _ in range(loader.filler_batches):  # FSDP: as many forwards as every rank (results unused)
            with session.autocast():
                step(module, batch, counted)
    finally:
        module.train()
    return metrics.compute()
