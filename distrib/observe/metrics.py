"""Exact global metrics kept as device-side sums, all-reduced only when read.

Adding to a device tensor never syncs with the host, so the per-step hot path stays free of
`.item()`; the one all-reduce and host read happen at the log interval (or after eval). Sums are
float64, so a global mean is exact (to fp64 rounding) whatever the world size and however uneven
the batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from distrib.runtime.collectives import all_reduce_sum

Number = torch.Tensor | float | int


class Metrics:
    """Weighted global means (`add`) and global totals (`add_total`) of named values.

    `add({"loss": mean_loss, "accuracy": acc}, weight=n)` adds a batch whose values are means over
    `n` items (samples or tokens); `compute()` returns sum(value * n) / sum(n) over every rank. A
    name that was never added is absent from the result, not a 0.
    """

    distrib_per_rank = True  # checkpointed per rank: the sums are this rank's share

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._means: dict[str, torch.Tensor] = {}  # name -> [sum of value * weight, sum of weight]
        self._totals: dict[str, torch.Tensor] = {}  # name -> [sum]

    def _slot(self, table: dict[str, torch.Tensor], name: str, size: int) -> torch.Tensor:
        slot = table.get(name)
        if slot is None:
            slot = table[name] = torch.zeros(size, dtype=torch.float64, device=self.device)
        return slot

    def add(self, values: Mapping[str, Number | tuple[Number, Number]], weight: Number = 1) -> None:
        """Add means over `weight` items, or `(sum, count)` pairs with their own denominator (exact counts).

        Device tensors stay on the device: no host sync.
        """
        w = _f64(weight)
        for name, value in values.items():
            slot = self._slot(self._means, name, 2)
            if isinstance(value, tuple):
                slot[0] += _f64(value[0])
                slot[1] += _f64(value[1])
            else:
                slot[0] += _f64(value) * w
                slot[1] += w

    def add_total(self, name: str, amount: Number) -> None:
        """Add to a global total (a count of samples, tokens, ...)."""
        slot = self._slot(self._totals, name, 1)
        slot[0] += amount.detach().to(torch.float64) if isinstance(amount, torch.Tensor) else float(amount)

    def compute(self, extra: Sequence[float] = ()) -> dict[str, Any]:
        """All-reduce over ranks and read the global means and totals. A collective: call on every rank.

        `extra` values ride on the same all-reduce and come back summed over ranks as `extra`: the
        log interval's other global numbers (the stop vote, timings) cost no collective of their own.
        """
        means, totals = sorted(self._means), sorted(self._totals)
        parts = [self._means[n] for n in means] + [self._totals[n] for n in totals]
        if extra:
            parts.append(torch.tensor(list(extra), dtype=torch.float64).to(self.device, non_blocking=True))
        if not parts:
            return {"extra": []} if extra else {}
        values = all_reduce_sum(torch.cat(parts)).tolist()
        out: dict[str, Any] = {}
        for i, name in enumerate(means):
            total, weight = values[2 * i], values[2 * i + 1]
            if weight:
                out[name] = total / weight
        base = 2 * len(means)
        for i, name in enumerate(totals):
            value = values[base + i]
            out[name] = int(value) if float(value).is_integer() else value
        if extra:
            out["extra"] = values[base + len(totals) :]
        return out

    def reset(self) -> None:
        """Zero the sums in place (the names stay, so the all-reduce keeps its layout)."""
        for slot in (*self._means.values(), *self._totals.values()):
            slot.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"means": {k: v.cpu() for k, v in self._means.items()}, "totals": {k: v.cpu() for k, v in self._totals.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._means = {k: v.to(self.device) for k, v in state["means"].items()}
        self._totals = {k: v.to(self.device) for k, v in state["totals"].items()}


def _f64(x: Number) -> torch.Tensor | float:
    return x.detach().to(torch.float64) if isinstance(x, torch.Tensor) else float(x)


def count_correct(outputs: Any, labels: Any) -> torch.Tensor | None:
    """Correct predictions for classification (logits [N, C] vs integer labels [N]); None otherwise."""
    if isinstance(outputs, torch.Tensor) and isinstance(labels, torch.Tensor) and outputs.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point():
        return (outputs.argmax(dim=1) == labels).sum()
    return None


def shown(computed: dict[str, Any], *, per_token: bool) -> dict[str, Any]:
    """The metrics a log line shows from `Metrics.compute()`'s result: loss first, the counts left out,
    and perplexity where the loss is a mean per token."""
    named = {k: v for k, v in sorted(computed.items(), key=lambda kv: kv[0] != "loss") if k not in ("samples", "items", "extra")}
    if per_token and "loss" in named:
        named["perplexity"] = math.exp(min(named["loss"], 700.0))
    return named


def one_line(metrics: dict[str, Any]) -> str:
    """`loss 0.1234 | accuracy 0.9876`: the float metrics of a console line."""
    return " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("count", "epoch") and isinstance(v, float))


def console_line(kind: str, step: int, record: Mapping[str, Any]) -> str:
    """`train step 12 | loss 0.5 | note text`: a logged record's numbers and words, as the console shows them."""
    shown = " | ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
    )
    return f"{kind} step {step}{' | ' + shown if shown else ''}"
