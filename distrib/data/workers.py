"""DataLoader workers: deaf to the rank's stop signals from their first instruction, and seeded per
(seed, rank, epoch, worker), reproducibly on resume."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import random
import signal
from typing import Any

import numpy as np
import torch

from distrib.runtime.stop import ignore_stop_signals


def init_worker(worker_id: int) -> None:
    """A DataLoader worker's start: ignore the rank's stop signals, seed python/numpy from torch's seed.

    A worker must not die of the SIGTERM/SIGUSR1/SIGINT meant for its rank (`distrib/runtime/stop.py`).
    torch gives each worker `base_seed + worker_id`, and the base seed comes from the loader's own
    generator, which `TrainLoader.set_epoch` derives from (seed, rank, epoch): distinct per rank,
    worker and epoch, and reproducible on resume.
    """
    ignore_stop_signals()
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


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
