"""DataLoader workers: deaf to the rank's stop signals from their first instruction, and seeded per
(seed, rank, epoch, worker), reproducibly on resume."""

from __future__ import annotations

import faulthandler
import multiprocessing
import multiprocessing.context
import os
import random
import signal
import time
from typing import Any

import numpy as np
import torch

from distrib.runtime.ledger import user_file
from distrib.runtime.stop import ignore_stop_signals


def init_worker(worker_id: int) -> None:
    """A DataLoader worker's start: ignore the rank's stop signals, seed python/numpy from torch's seed.

    A worker must not die of the SIGTERM/SIGUSR1/SIGINT meant for its rank (`distrib/runtime/stop.py`).
    torch gives each worker `base_seed + worker_id`, and the base seed comes from the loader's own
    generator, which `TrainLoader.set_epoch` derives from (seed, rank, epoch): distinct per rank,
    worker and epoch, and reproducible on resume.
    """
    ignore_stop_signals()
    _dump_stacks_on_signal()
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


STACK_SIGNAL = signal.SIGUSR2
"""What makes a worker write its stacks (for the hang watchdog, `distrib/observe/hang.py`)."""
_stacks_dir: str | None = None  # the rank's private directory for its workers' stack files; inherited by fork


def set_stacks_dir(path: str | None) -> None:
    """Where workers forked from now on write their stacks on `STACK_SIGNAL` (None: they do not)."""
    global _stacks_dir
    _stacks_dir = path


def _dump_stacks_on_signal() -> None:
    if _stacks_dir is None:
        return
    path = os.path.join(_stacks_dir, f"worker-{os.getpid()}.txt")
    out = open(path + ".new", "w")  # noqa: SIM115 (open for the worker's life: faulthandler writes to it)
    faulthandler.register(STACK_SIGNAL, file=out, all_threads=True)
    os.rename(path + ".new", path)  # a file under its final name promises the handler is in place


def _live_workers() -> list[int]:
    """This process's DataLoader workers that registered for `STACK_SIGNAL` (a stack file under their pid):
    its own children only, so no other process is ever signalled."""
    if _stacks_dir is None:
        return []
    pids = []
    for name in os.listdir(_stacks_dir):
        if not (name.startswith("worker-") and name.endswith(".txt")):
            continue
        pid = int(name[len("worker-") : -len(".txt")])
        if _parent_of(pid) == os.getpid():
            pids.append(pid)
        else:  # a worker of an earlier epoch, gone
            os.unlink(os.path.join(_stacks_dir, name))
    return pids


def kill_workers() -> None:
    """End this process's DataLoader workers now (before it exits abruptly: a worker stuck in user code never
    notices its parent's death)."""
    for pid in _live_workers():
        os.kill(pid, signal.SIGKILL)


def worker_stacks(wait_s: float = 0.5) -> dict[int, tuple[str, str | None]]:
    """Each live DataLoader worker of this process: its threads' stacks, and its innermost frame in user code."""
    if _stacks_dir is None:
        return {}
    pids = _live_workers()
    for pid in pids:
        os.kill(pid, STACK_SIGNAL)
    if pids:
        time.sleep(wait_s)
    out = {}
    for pid in pids:
        with open(os.path.join(_stacks_dir, f"worker-{pid}.txt")) as f:
            text = f.read()
        out[pid] = (text, _innermost_user_frame(text))
    return out


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _innermost_user_frame(text: str) -> str | None:
    """The first (innermost) frame of a faulthandler dump that is not Python's, an installed package's or distrib's."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith('File "') and '", line ' in line:
            filename, rest = line[len('File "') :].split('", line ', 1)
            if user_file(filename):
                lineno, _, func = rest.partition(" in ")
                return f"{os.path.basename(filename)}:{lineno.strip()} {func.strip()}"
    return None


class _DeafForkProcess(multiprocessing.context.ForkProcess):
    """A DataLoader worker forked with SIGTERM blocked, so it is deaf to it from its first instruction.

    `init_worker` then takes SIGTERM in a thread that obeys only the parent; without this, a signal
    in the moments between the fork and `init_worker` met torch's own handler, which exits on anyone's.
    """

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _DeafForkContext(multiprocessing.context.ForkContext):
    Process = _DeafForkProcess


def worker_context() -> Any:
    """The context DataLoader workers start from: the deaf fork where fork is the default, else the default."""
    # allow_none=True: asking must not fix the start method for the user's own code.
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return _DeafForkContext() if method == "fork" else None
