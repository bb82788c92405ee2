"""Collectives that are no-ops in a single process.

Single-process debugging then runs the very same code path as an N-rank job (torchtitan's
`dist_sum` returns its input; Fabric's `barrier` returns early). Each one a rank issues is numbered
in its ledger (`ledger.py`) with its op, shapes and caller, for the hang verdict.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist

from distrib.errors import ConfigError
from distrib.runtime.ledger import LEDGER


def active() -> bool:
    """Whether there is a process group of more than one rank to talk to."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or `mean`) `tensor` over ranks in place and return it; unchanged in a single process."""
    if op not in ("sum", "mean"):
        raise ConfigError(f"all_reduce op={op!r}: use 'sum' or 'mean'.")
    all_reduce_sum(tensor)
    if op == "mean" and active():
        tensor /= tdist.get_world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place and return it; returns it unchanged in a single process."""
    if active():
        with LEDGER.collective("all_reduce", tensor):
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_reduce_sum_async(tensor: torch.Tensor) -> Any:
    """Start summing `tensor` over ranks in place; returns the work to `wait()` on (None in a single process)."""
    if active():
        with LEDGER.collective("all_reduce (async)", tensor):  # numbered; its wait is the caller's
            return tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM, async_op=True)
    return None


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order; `[obj]` in a single process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    with LEDGER.collective("all_gather_object"):
        tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank; `obj` itself in a single process."""
    if not active():
        return obj
    box = [obj]
    with LEDGER.collective("broadcast_object"):
        tdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(group: Any = None) -> None:
    if active():
        with LEDGER.collective("barrier"):
            tdist.barrier(group=group)
