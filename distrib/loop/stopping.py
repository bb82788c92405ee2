"""A graceful stop inside a loop: the ranks agree on it, the loop saves, and the stop is reported.

`StopRequest` (`distrib/runtime/stop.py`) is the flag a signal sets on one rank. `StopAgreement` is
what the session makes of it: a vote summed over ranks (at `should_stop()`, or riding on fit's log
interval all-reduce), said once; the step of the checkpoint saved after it; and the stopped.json
record that tells the Slurm epilogue (and a person) where to resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distrib.runtime.collectives import all_reduce_sum
from distrib.runtime.console import log
from distrib.runtime.stop import EXIT_STOPPED, StopRequest


class StopAgreement:
    """One session's graceful stop: agreed across ranks, checkpointed, then recorded."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop
        self.agreed = False
        """Some rank asked to stop, and every rank knows (should_stop() or fit's log interval said so)."""
        self.stopped_at: int | None = None
        """The step the stop checkpointed at, once stopped.json is written."""
        self._saved: tuple[int, bool] | None = None  # the last save's step, and whether it came after the agreement
        self.world_size, self.device = 1, torch.device("cpu")

    def bind(self, world_size: int, device: torch.device) -> None:
        """Where the vote is all-reduced (known once the process group is up)."""
        self.world_size, self.device = world_size, device

    def poll(self) -> bool:
        """Sum the ranks' ballots (a collective) and agree if any rank asked."""
        if self.world_size == 1:
            votes = int(self.stop.requested)
        else:
            votes = self.stop.count(all_reduce_sum(torch.tensor(self.stop.ballot(), device=self.device)).tolist())
        self.agree(votes)
        return votes > 0

    def agree(self, votes: int, where: str = "") -> None:
        """Note that `votes` ranks asked to stop (logged once, on rank 0)."""
        if votes and not self.agreed:
            self.agreed = True
            log.info(f"{self.stop.reason} received by {votes} of {self.world_size} ranks: stopping{' ' + where if where else ''} with a checkpoint")

    def saved(self, step: int) -> None:
        """A checkpoint was saved at `step`."""
        self._saved = (step, self.agreed)

    def saved_after_agreement(self) -> int | None:
        """The step of the checkpoint saved since the agreement (the stop's), or None, said with a warning."""
        if self._saved is not None and self._saved[1]:
            return self._saved[0]
        log.warning(
            f"{self.stop.reason}: the loop stopped without saving after the stop was agreed; a rerun resumes "
            "from the newest checkpoint before it. HINT: call session.save(state) when should_stop() says yes."
        )
        return None

    def record(self, step: int) -> dict[str, Any]:
        """stopped.json's record of a stop checkpointed at `step`."""
        return {"step": step, "signal": self.stop.reason, "exit_status": EXIT_STOPPED}

    def finished(self, step: int, detail: str, ckpt_root: Path) -> None:
        """stopped.json is written: say how to resume."""
        self.stopped_at = step
        log.info(f"stopped at step {step}{detail}; checkpoint saved in {ckpt_root}. Exit status {EXIT_STOPPED}: run the same command again to continue.")
