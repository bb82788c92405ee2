"""The non-finite guard (`train.nonfinite`): no optimizer step writes NaN or inf into the model unseen.

Every optimizer step checks the norm of its gradients. The decision is the same on every rank
without a collective of its own: under DDP every rank holds the same all-reduced gradients; under
FSDP the norm of the sharded gradients is all-reduced (the one scalar that clipping computes anyway).
A non-finite loss makes its gradients non-finite, so the gradients are the one thing to check.

What happens to a bad step, and what it costs (no host sync on steps that are not logged, except
where the table says so):

| optimizer | `error` (default) | `skip` |
|---|---|---|
| fused (`fused=True` AdamW/Adam/SGD) | dropped on the device; the run stops at the next log interval or checkpoint | dropped on the device; counted at the next log interval |
| any other | applied; the run stops at the next log interval or checkpoint, before anything is saved | dropped: one scalar read per step |
| any, `train.precision=fp16` | GradScaler drops it and lowers the scale; counted as a skip | the same |

Either way no checkpoint ever holds a non-finite value: every save first reads the guard. A run
stops (exit 1, `NonFiniteError`) on the first bad step under `error`, and after
`train.max_skipped_steps` bad steps in a row under `skip` (or fp16): the message names the step,
the rank whose loss was non-finite first, its samples, and the last good checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distrib.data.loaders import TrainLoader
from distrib.errors import NonFiniteError
from distrib.runtime.collectives import all_gather_object
from distrib.runtime.console import log


class NonfiniteGuard:
    """One session's record of bad steps: which were dropped, and when the run must stop."""

    def __init__(self, mode: str, max_skipped: int, device: torch.device, *, scaler: bool = False) -> None:
        self.mode, self.max_skipped, self.device = mode, max_skipped, device
        # Under fp16 GradScaler drops overflowing steps as a matter of course: they are counted, and only
        # max_skipped of them in a row stop the run. Otherwise `error` stops on the first bad step.
        self.stop_on_first = mode == "error" and not scaler
        self.skipped: list[int] = []
        """Steps whose update was dropped, in order (known up to the last `check`)."""
        self.unlogged: list[int] = []
        """Of those, the ones no metrics line has listed yet (fit's log interval takes them)."""
        self._pending: list[tuple[int, torch.Tensor | bool]] = []  # (step, bad), bad still on the device where it was not read
        self._first_applied_bad: torch.Tensor | None = None  # `error`, non-fused: the first bad update's step (-1: none)
        self._own_loss_bad = torch.full((), -1, dtype=torch.int64, device=device)  # this rank's first non-finite loss
        self._run = 0  # bad steps in a row, up to the last check
        self.loader: TrainLoader | None = None
        """The session's latest train loader: it names a step's samples."""

    # ------------------------------------------------------------------ per step (no host sync)

    def note_loss(self, loss: torch.Tensor, step: int) -> None:
        """Remember the step at which this rank's own loss was first non-finite (before any reduction)."""
        first = (self._own_loss_bad < 0) & ~torch.isfinite(loss.detach()).all()
        self._own_loss_bad = torch.where(first, step, self._own_loss_bad)

    def step(self, optimizer: torch.optim.Optimizer, norm: torch.Tensor, step: int) -> None:
        """Apply `optimizer`'s step unless the gradients' norm is non-finite (see the module's table)."""
        bad = ~torch.isfinite(norm)
        if getattr(optimizer, "_step_supports_amp_scaling", False):  # fused: found_inf drops the update on the device
            optimizer.found_inf = bad.to(torch.float32)  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf  # type: ignore[attr-defined]
            self._pending.append((step, bad))
        elif self.mode == "skip":
            dropped = bool(bad.item())  # the one scalar read per step that `skip` costs with a non-fused optimizer
            if not dropped:
                optimizer.step()
            self._pending.append((step, dropped))
        else:
            optimizer.step()
            at = torch.where(bad, step, -1)
            first = self._first_applied_bad
            self._first_applied_bad = at if first is None else torch.where(first < 0, at, first)

    def take_unlogged(self) -> list[int]:
        """The dropped steps no metrics line has listed yet; a log line lists them once."""
        steps, self.unlogged = self.unlogged, []
        return steps

    def scaler_step(self, found_inf: torch.Tensor, step: int) -> None:
        """fp16: GradScaler dropped (or applied) the update; count its drops like the guard's own."""
        self._pending.append((step, found_inf > 0))

    # ------------------------------------------------------------------ at log intervals and saves

    def describe(self, step: int) -> str:
        """This rank's samples of `step`."""
        return self.loader.samples_of(step) if self.loader is not None else f"step {step}"

    def check(self, last_good: Callable[[], str | None]) -> list[int]:
        """Read the steps since the last check (a host sync: call it where one happens anyway) and return
        the newly dropped ones, or raise NonFiniteError on every rank alike (with a collective, on that path only).

        `last_good()` names the checkpoint a rerun resumes from.
        """
        failed: int | None = None
        if self._first_applied_bad is not None:
            first = int(self._first_applied_bad.item())
            self._first_applied_bad = None
            if first >= 0:
                failed = first
        newly: list[int] = []
        if self._pending:
            flags = [bool(f) for f in torch.stack([torch.as_tensor(b) for _, b in self._pending]).tolist()]
            for (step, _), bad in zip(self._pending, flags, strict=True):
                self._run = self._run + 1 if bad else 0
                if bad:
                    newly.append(step)
                    if failed is None and (self.stop_on_first or self._run >= self.max_skipped):
                        failed = step
            self._pending.clear()
        self.skipped += newly
        self.unlogged += newly
        if failed is not None:
            self._fail(failed, last_good)
        for step in newly:
            log.warning(f"step {step}: non-finite gradients on every rank; the step was dropped (train.nonfinite={self.mode}) at {self.describe(step)}")
        return newly

    def _fail(self, step: int, last_good: Callable[[], str | None]) -> None:
        own = int(self._own_loss_bad.item())
        seen = all_gather_object((own, self.describe(own if own >= 0 else step)))
        first_seen = min((s for s, _ in seen if s >= 0), default=-1)
        ranks = [r for r, (s, _) in enumerate(seen) if s >= 0 and s == first_seen]
        if ranks:
            where = f"rank {ranks[0]}'s loss was the first not finite, at step {first_seen} ({seen[ranks[0]][1]})"
        else:
            where = f"every rank's loss was finite, so the backward pass overflowed (rank 0's samples: {seen[0][1]})"
        if self.stop_on_first:
            what = f"the gradients of optimizer step {step} are not finite (NaN or inf); the run stops before any checkpoint holds them"
        else:
            what = (
                f"{self._run} optimizer steps in a row, up to step {step}, had non-finite gradients and were dropped "
                f"(train.max_skipped_steps={self.max_skipped})"
            )
        raise NonFiniteError(
            f"{what}: {where}. HINT: look at those samples and the learning rate; --train.clip_grad_norm bounds a spike, "
            "and --train.nonfinite skip drops a bad step instead of stopping.",
            last_good=last_good(),
        )
