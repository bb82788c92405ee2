"""Asynchronous checkpoints: the step waits only for a host copy of the state.

`Saver.submit` runs one save in a background thread, at the lowest CPU priority; a second submit
first waits for the one in flight, so at most one save (and one host copy of the state) exists at
a time. The thread's barriers run on a process group of their own (gloo), so they never
interleave with the training thread's collectives on the default group. Errors surface in the
training thread at the next `submit` or `wait`.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from distrib.runtime.console import log


def snapshot(obj: Any) -> Any:
    """A copy of `obj` that later steps cannot change: every tensor in its containers copied to host memory."""
    return pytree.tree_map(lambda v: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v, obj)


def _yield_cpu() -> None:
    """Run this thread at the lowest CPU priority (Linux: nice is per thread).

    A save is CPU work (serialising, checksumming) that must not take cores from the ranks: at the
    lowest priority it runs in the time they leave idle (waiting on a collective or on data) and
    yields to them otherwise. Measured at 2 ranks on 2 cores (bench/defaults.py): 8.5 ms of step
    stall per checkpoint against 15.3 ms at normal priority. The thread still gets the CPU whenever a
    core is free, and a stop or the end of training waits for it as before.
    """
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


class Saver:
    """At most one background save in flight."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, save: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                _yield_cpu()
                save()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="distrib-checkpoint", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the save in flight is committed (or failed: then raise its error here)."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning(f"a checkpoint save is still running after {timeout:g} s; leaving it (its .tmp directory is ignored on resume)")
                return
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
