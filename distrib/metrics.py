"""Loss/accuracy kept as device-side sums and counts, all-reduced only when read.

Adding to a device tensor never syncs with the host, so the per-step hot path stays free of
`.item()`; the one all-reduce and host read happen at the log interval. Sums are float64 so the
global mean is exact (to fp64 rounding) whatever the world size and however uneven the batches.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from distrib.dist import all_reduce_sum


class MeanMetrics:
    """Sample-weighted global mean of the loss, and accuracy, over everything added since reset()."""

    def __init__(self, device: torch.device) -> None:
        # [loss_sum, correct, count]: one tensor, so reading them costs one all-reduce.
        self._sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, mean_loss: torch.Tensor, correct: torch.Tensor | None, count: int) -> None:
        """Add a batch: its mean loss (a 0-dim tensor), number of correct predictions, and size."""
        self._sums[0] += mean_loss.detach().to(torch.float64) * count
        if correct is not None:
            self._sums[1] += correct.to(torch.float64)
        self._sums[2] += count

    def reduce(self, extra: Sequence[float] = ()) -> dict[str, Any]:
        """All-reduce over ranks and read: {loss, accuracy, count} (+ `extra`). A collective: call on every rank.

        `extra` values ride on the same all-reduce and come back summed over ranks as `extra`: the
        log interval's other global numbers (the graceful-stop vote, timings) cost no collective of their own.
        """
        buf = self._sums
        if extra:
            buf = torch.cat([buf, torch.tensor(list(extra), dtype=torch.float64).to(buf.device, non_blocking=True)])
        values = all_reduce_sum(buf.clone() if not extra else buf).tolist()
        loss_sum, correct, count = values[:3]
        out: dict[str, Any] = (
            {"loss": loss_sum / count, "accuracy": correct / count, "count": int(count)}
            if count
            else {"loss": float("nan"), "accuracy": float("nan"), "count": 0}
        )
        if extra:
            out["extra"] = values[3:]
        return out

    def reset(self) -> None:
        self._sums.zero_()

    def state(self) -> torch.Tensor:
        return self._sums.clone()

    def load(self, sums: torch.Tensor) -> None:
        self._sums.copy_(sums)


def count_correct(outputs: Any, labels: Any) -> torch.Tensor | None:
    """Correct predictions for classification (logits [N, C] vs integer labels [N]); None otherwise."""
    if (
        isinstance(outputs, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and outputs.dim() == 2
        and labels.dim() == 1
        and not labels.is_floating_point()
    ):
        return (outputs.argmax(dim=1) == labels).sum()
    return None
