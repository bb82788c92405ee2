"""The global batch split over ranks: `train.global_batch_size` as micro-batches and `grad_accum` per rank.

With a global batch of G samples per optimizer step and W ranks, each rank takes G / W samples per
step, as `grad_accum` micro-batches of at most `train.batch_size` (the largest a rank's memory takes).
Rank r reads the samples r, r+W, r+2W, ... of the epoch's permutation (`DistributedSampler`), so
optimizer step s trains on the permutation's positions s·G to (s+1)·G - 1 at any W: the same samples
in every step, in the same order of steps, whatever the layout. Only the order in which the step's
per-sample gradients are summed changes, so runs agree to float tolerance, not bitwise.
"""

from __future__ import annotations

import dataclasses
import math

from distrib.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchSplit:
    """One world size's split of the global batch (`summary.json`'s `batch_splits` lists each one a run used)."""

    global_batch: int
    world_size: int
    micro_batch: int
    grad_accum: int

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = {self.micro_batch} per micro-batch x {self.grad_accum} micro-batch"
            f"{'es' if self.grad_accum > 1 else ''} x {self.world_size} process{'es' if self.world_size > 1 else ''}"
        )


def split_global_batch(global_batch: int, *, max_micro_batch: int, world_size: int) -> BatchSplit:
    """The split with the fewest micro-batches (so the largest micro-batch) that divides each rank's share evenly.

    Every micro-batch of a full step has the same size, so each one's loss weighs the same and the
    step equals one batch of the global size. A share with no divisor near `max_micro_batch` (a
    prime) takes small micro-batches: distrib says so and names global batches that split better.
    """
    if global_batch % world_size:
        raise ConfigError(
            f"train.global_batch_size={global_batch} does not split evenly over {world_size} processes "
            f"({global_batch}/{world_size} = {global_batch / world_size:.2f} samples each). HINT: pass "
            f"--train.global_batch_size {' or '.join(map(str, nearest_multiples(global_batch, world_size)))}, or run on "
            f"{' or '.join(map(str, nearest_divisors(global_batch, world_size)))} processes (divisors of {global_batch})."
        )
    share = global_batch // world_size
    accum = next(a for a in range(math.ceil(share / max_micro_batch), share + 1) if share % a == 0)
    return BatchSplit(global_batch=global_batch, world_size=world_size, micro_batch=share // accum, grad_accum=accum)


def nearest_multiples(n: int, k: int) -> list[int]:
    """The multiples of `k` nearest `n`, below (when positive) and above."""
    below = n // k * k
    return [m for m in (below, below + k) if m > 0]


def nearest_divisors(n: int, k: int) -> list[int]:
    """The divisors of `n` nearest `k`, below and above (those that exist)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = [d for d in divisors if d < k]
    above = [d for d in divisors if d > k]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def small_micro_batch_note(split: BatchSplit, max_micro_batch: int) -> str | None:
    """A note when each rank's share has no divisor near train.batch_size, so the micro-batches are under half of it."""
    share = split.global_batch // split.world_size
    if split.micro_batch * 2 >= min(share, max_micro_batch):
        return None
    good = [g for g in range(split.global_batch - 8 * split.world_size, split.global_batch + 8 * split.world_size + 1, split.world_size) if g > 0]
    better = min(
        good, key=lambda g: (-split_global_batch(g, max_micro_batch=max_micro_batch, world_size=split.world_size).micro_batch, abs(g - split.global_batch))
    )
    return (
        f"{split.describe()}: each process's {share} samples per step have no divisor near train.batch_size={max_micro_batch}, "
        f"so its micro-batches are small. HINT: a global batch of {better} splits into micro-batches of "
        f"{split_global_batch(better, max_micro_batch=max_micro_batch, world_size=split.world_size).micro_batch} here."
    )
