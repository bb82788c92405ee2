"""Graceful stop: SIGTERM or SIGUSR1 makes every rank stop at the same optimizer step and checkpoint.

The handler only sets a flag. Ranks agree on it at the next log interval, where the flag rides on
the metric all-reduce that happens there anyway, so no step pays for an extra collective. A rank
that got no signal (torchrun forwards SIGTERM to every worker, Slurm signals every task, but a user
may `kill` one process) stops too, because the agreement is a sum over ranks.

The process then exits with `EXIT_STOPPED` (75, `EX_TEMPFAIL` from sysexits.h: "try again later"):
relaunching the same command resumes from the checkpoint written at the stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

EXIT_STOPPED = 75
"""Exit status of a run stopped by a signal after writing its checkpoint."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A flag a signal handler (or user code, e.g. a callback) sets; the trainer reads it at the log interval."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.requested = False

    def set(self, signum: int | None = None) -> None:
        # Signal-handler safe: two attribute stores, no I/O, no locks.
        self.signum = signum if self.signum is None else self.signum
        self.requested = True

    @property
    def reason(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop request"


@contextlib.contextmanager
def stop_on_signals(request: StopRequest, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Route `signals` to `request` while the block runs, then restore the previous handlers.

    Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread)
    the block runs without them and signals keep their previous meaning.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda signum, frame: request.set(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
