"""Graceful stop: SIGTERM, SIGUSR1, SIGHUP or Ctrl-C makes every rank stop at the same optimizer step and checkpoint.

The handler only sets a flag. Ranks agree on it at the next log interval, where the flag rides on
the metric all-reduce that happens there anyway, so no step pays for an extra collective. A rank
that got no signal (torchrun forwards SIGTERM to every worker, Slurm signals every task, but a user
may `kill` one process) stops too, because the agreement is a sum over ranks; the ballot has a slot
per signal, so every rank (and stopped.json) names the signal that arrived, wherever it arrived.
SIGHUP is a dropped ssh session or a closed terminal: a stop with a checkpoint, not a lost run.

The process then exits with `EXIT_STOPPED` (75, `EX_TEMPFAIL` from sysexits.h: "try again later"):
relaunching the same command resumes from the checkpoint written at the stop.

Ctrl-C (SIGINT) is a graceful stop too; a second Ctrl-C, a second or more later, aborts at once
(`KeyboardInterrupt`). The window matters under torchrun: a terminal's Ctrl-C reaches the rank
directly *and* through the agent, which forwards it, so the two copies of one press must count once.
torchrun's agent passes a second press on as SIGTERM, so after a Ctrl-C a SIGTERM aborts too.

DataLoader workers ignore them all (`ignore_stop_signals`, installed by distrib's loaders):
torchrun and Slurm signal a rank's whole process group, and a worker that died of the signal
would make the rank's DataLoader raise in the middle of the stop checkpoint. The workers still
end with their rank: the DataLoader shuts them down, and they exit by themselves when it dies.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

EXIT_STOPPED = 75
"""Exit status of a run stopped by a signal after writing its checkpoint."""
STOPPED_FILE = "stopped.json"
"""Written by rank 0 when a run stops on a signal with a checkpoint (the Slurm epilogue requeues on it)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)

SECOND_CTRL_C_S = 1.0
"""A SIGINT this long after the first one aborts; closer ones are copies of the same press."""


class StopRequest:
    """A flag a signal handler (or user code, e.g. a callback) sets; the trainer reads it at the log interval."""

    def __init__(self, when: str = "when the loop next calls session.should_stop()") -> None:
        self.signum: int | None = None
        self.requested = False
        self.when = when
        """Where the stop takes effect, for the Ctrl-C message (`fit`: at the next log interval)."""
        self._first_sigint: float | None = None

    def set(self, signum: int | None = None) -> None:
        # Signal-handler safe: two attribute stores, no I/O, no locks.
        self.signum = signum if self.signum is None else self.signum
        self.requested = True

    @property
    def reason(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop request"

    def handle(self, signum: int, frame: object = None) -> None:
        """The signal handler: a stop request, except that a second Ctrl-C (under torchrun: a SIGTERM) aborts."""
        now = time.monotonic()
        if self._first_sigint is not None and signum in (signal.SIGINT, signal.SIGTERM) and now - self._first_sigint > SECOND_CTRL_C_S:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and self._first_sigint is None:
            self._first_sigint = now
            # Said at once: the stop itself waits for the loop.
            os.write(2, f"distrib: Ctrl-C: stopping {self.when} with a checkpoint (Ctrl-C again to abort)\n".encode())
        self.set(signum)

    def ballot(self) -> list[float]:
        """This rank's vote: 1 in its signal's slot (the last slot: a request without a signal), else zeros.

        The caller sums the ballots over ranks (on a reduction that happens anyway) and passes the sum to `count`.
        """
        slots = [0.0] * (len(STOP_SIGNALS) + 1)
        if self.requested:
            slots[STOP_SIGNALS.index(self.signum) if self.signum in STOP_SIGNALS else -1] = 1.0
        return slots

    def count(self, summed: Sequence[float]) -> int:
        """The ranks that asked to stop, from the summed ballots; a rank without a signal of its own takes
        the one most ranks got, so every rank names the same signal."""
        votes = int(round(sum(summed)))
        named = [i for i in range(len(STOP_SIGNALS)) if summed[i] > 0]
        if votes and self.signum is None and named:
            self.signum = STOP_SIGNALS[max(named, key=lambda i: summed[i])]
        if votes:
            self.requested = True
        return votes


LAUNCHER_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""What torchrun's agent must pass on to its workers; its default lacks SIGUSR1, which kills the agent and orphans them."""


def torchrun_signal_flag() -> str:
    """`--signals-to-handle=...` where this torch's torchrun has the flag (it then overrides the
    TORCHELASTIC_SIGNALS_TO_HANDLE variable that older versions read); else ''. The launchers pass it."""
    import dataclasses

    from torch.distributed.launcher.api import LaunchConfig

    if "signals_to_handle" in {f.name for f in dataclasses.fields(LaunchConfig)}:
        return f"--signals-to-handle={LAUNCHER_SIGNALS}"
    return ""


def ignore_stop_signals() -> None:
    """For a DataLoader worker: ignore SIGUSR1, SIGINT and SIGHUP, and a SIGTERM from anyone but its parent.

    The parent's SIGTERM must still end it: at exit, Python's multiprocessing terminates its daemonic
    children (the workers) with SIGTERM and then joins them without a timeout. So SIGTERM is blocked
    and a thread takes it with `sigwaitinfo`, which names the sender (as torch's own C handler does).
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
    parent = os.getppid()

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name="distrib-worker-sigterm", daemon=True).start()


class SignalRoute:
    """Stop signals routed to a `StopRequest` from `install()` to the end of the `with` block.

    The two ends are apart on purpose: a session installs the route once the ranks have met (a
    signal during the rendezvous must still end the process at once) and enters the block before
    the process group, so the route outlives the group's teardown. A signal after the last step,
    while a rank waits in the final barrier, is then a stop request for a run that is already over,
    not a rank killed under its peers' barrier.

    Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread)
    `install` does nothing and signals keep their previous meaning.
    """

    def __init__(self, request: StopRequest, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.request, self.signals = request, signals
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {s: signal.signal(s, self.request.handle) for s in self.signals}

    def __enter__(self) -> SignalRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        previous, self._previous = self._previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler)
