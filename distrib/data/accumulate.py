"""Exact gradient accumulation: each micro-batch's weight, from the step's item count summed over
micro-batches and ranks (all-reduced in the background, once per step)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from distrib.runtime.collectives import all_reduce_sum_async

ItemCounter = Callable[[Any], "torch.Tensor | int"]
"""Counts what a batch's loss averages over (e.g. its label tokens); None: the samples."""


class StepCount:
    """A step's item count summed over ranks, all-reduced in the background while the forward computes.

    The sum is needed only to weight the loss before backward, so the collective is started when the
    step's micro-batches are loaded and waited for at first use (on NCCL the wait orders streams; no
    host sync). Every rank starts it at the same point, so it never reorders with DDP's all-reduces.
    """

    def __init__(self, local: torch.Tensor) -> None:
        self._total = local.clone()
        self._work = all_reduce_sum_async(self._total)

    @property
    def total(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._total


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of an optimizer step, on the device, with the weight that makes accumulation exact.

    With `items` the local count of what the loss averages over (samples, or label tokens) and
    `step_items` the same count summed over the step's micro-batches on every rank:
    `loss * weight` (a mean over this micro-batch's items) makes the accumulated, DDP-averaged
    gradient that of the whole step's mean, whatever the split. For a model that divides its loss by
    `num_items_in_batch` (Hugging Face's convention): pass `local_step_items` (this rank's count, known
    at once) and scale by `normalized_weight`; or pass `step_items` and scale by `world_size`.
    """

    batch: Any
    """The batch, every tensor on the device."""
    size: int
    """Samples in this micro-batch (on this rank)."""
    items: Any
    """What the loss averages over in this micro-batch: `size`, or a device tensor of tokens."""
    local_step_items: Any
    """`items` summed over the optimizer step's micro-batches on this rank."""
    world_size: int
    last: bool
    """The step's last micro-batch: its backward all-reduces the gradients; the optimizer steps after it."""
    epoch: int
    """The epoch this micro-batch belongs to."""
    count: Any = dataclasses.field(default=None, repr=False)
    """The step's global count: a number, or a `StepCount` whose all-reduce may still be running."""

    @property
    def step_items(self) -> Any:
        """`items` summed over the optimizer step's micro-batches and every rank (waits for its all-reduce)."""
        return self.count.total if isinstance(self.count, StepCount) else self.count

    @property
    def weight(self) -> Any:
        """Scale for a loss that is the mean over this micro-batch's items."""
        return self.items * self.world_size / self.step_items

    @property
    def normalized_weight(self) -> Any:
        """Scale for a loss divided by `local_step_items` (passed as `num_items_in_batch`)."""
        return self.local_step_items * self.world_size / self.step_items
