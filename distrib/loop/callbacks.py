"""Callbacks: hooks `fit` calls on every rank, with the trainer and what just happened.

Every rank calls every hook at the same point with the same all-reduced numbers, so a decision a
callback makes from them (early stopping) is the same on every rank without a collective of its
own. A callback with state (`state_dict`/`load_state_dict`) is checkpointed with the run.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from distrib.errors import ConfigError

if TYPE_CHECKING:
    from distrib.loop.trainer import Trainer


class Callback:
    """Override the hooks you need; the others do nothing."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After a training interval was all-reduced and logged (`record` is its metrics.jsonl line)."""

    def on_eval(self, trainer: Trainer, result: dict[str, Any]) -> None:
        """After an evaluation (`result`: global means over every eval sample once, `count`)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        """After epoch `epoch` finished and was evaluated, before its checkpoint."""

    def on_checkpoint(self, trainer: Trainer, step: int) -> None:
        """After a checkpoint at optimizer step `step` was committed."""

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """After training finished (not after a stop by signal), with the summary."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EarlyStopping(Callback):
    """Finish training when an eval metric stops improving for `patience` evaluations.

    The decision uses the all-reduced eval result, so every rank stops after the same epoch; the
    epoch's checkpoint is written, and the summary says `early_stopped`. Its counters are
    checkpointed, so a resumed run stops where the uninterrupted one would.
    """

    def __init__(self, monitor: str = "loss", *, mode: str = "min", patience: int = 3, min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ConfigError(f"EarlyStopping(mode={mode!r}): use 'min' or 'max'.")
        if patience < 1 or not math.isfinite(min_delta) or min_delta < 0:
            raise ConfigError(f"EarlyStopping(patience={patience}, min_delta={min_delta}): patience must be >= 1 and min_delta a finite value >= 0.")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.bad_evals = 0

    def on_eval(self, trainer: Trainer, result: dict[str, Any]) -> None:
        if self.monitor not in result:
            raise ConfigError(
                f"EarlyStopping monitors eval {self.monitor!r}, but evaluation reports {', '.join(sorted(result))}. HINT: EarlyStopping(monitor='loss')."
            )
        value = float(result[self.monitor])
        better = self.best is None or (value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta)
        if better:
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            trainer.finish_early(f"eval {self.monitor} did not improve on {self.best:.6g} for {self.bad_evals} evaluations")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = state["best"], state["bad_evals"]
