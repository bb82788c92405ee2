"""The hang watchdog: when no rank has made progress for `train.hang_timeout_s`, name the one holding
the others up, keep every rank's stacks, and end the job (exit 1) instead of waiting `dist.timeout_s`.

Each rank runs a daemon thread that reads the rank's ledger (`distrib/runtime/ledger.py`) once a
second. A rank that has not moved for the timeout, and is not in a phase that is progress however
long it takes (a checkpoint save, a compile), publishes its position and stacks under its key in the
rendezvous store: a side channel that needs no collective, so it works while the ranks are stuck in
one. A rank that moves on withdraws its report. Rank 0, once every rank's report has stood for two
of its checks, writes the verdict (`verdict.py`) and the stacks to `run.dir/hang-<time>/`, prints
the verdict, and sets the store's verdict key; every rank that sees it exits 1. The job's last
checkpoint stays the one a rerun resumes from.

A DataLoader worker cannot be asked for its stack by a thread of the rank: each worker dumps its
threads' stacks (faulthandler) on SIGUSR2 to a file in this rank's private directory
(`distrib/data/workers.py`), and the watchdog signals the rank's own workers when it reports.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as tdist

from distrib.data import workers
from distrib.errors import HangError, error_exit
from distrib.observe.verdict import frame_of, place, verdict
from distrib.runtime.console import log
from distrib.runtime.ledger import LEDGER, Ledger, user_file

VERDICT_FILE = "verdict.txt"


def thread_stacks() -> list[str]:
    """Every other thread's Python stack as lines, most recent call last, each headed by the thread's name."""
    names = {t.ident: t.name for t in threading.enumerate()}
    lines: list[str] = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue  # the caller (the watchdog) is no news
        lines.append(f"Thread {names.get(ident, '?')!r} (0x{ident:x}), most recent call last:")
        lines += [part for entry in traceback.format_stack(frame) for part in entry.rstrip("\n").split("\n")]
    return lines


def main_frame() -> tuple[str | None, bool]:
    """The main thread's innermost frame in user code (`file:line function`), and whether it waits for a DataLoader worker."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    stack = traceback.extract_stack(frame) if frame is not None else []
    waits_for_worker = any(f.filename.endswith(os.path.join("torch", "utils", "data", "dataloader.py")) for f in stack[-6:])
    for f in reversed(stack):
        if user_file(f.filename):
            return f"{os.path.basename(f.filename)}:{f.lineno} {f.name}", waits_for_worker
    return None, waits_for_worker


def report(rank: int, stalled_s: float, ledger: Ledger = LEDGER) -> dict[str, Any]:
    """This rank's position and stacks, as it publishes them (plain values, for JSON)."""
    frame, waits_for_worker = main_frame()
    stacks = workers.worker_stacks()
    found = next(((pid, f) for pid, (_, f) in stacks.items() if f), None) if waits_for_worker else None
    return {
        "rank": rank,
        "stalled_s": round(stalled_s, 1),
        **ledger.position(),
        "frame": frame,
        "worker_pid": found[0] if found else None,
        "worker_frame": found[1] if found else None,
        "threads": thread_stacks(),
        "workers": {str(pid): text for pid, (text, _) in stacks.items()},
    }


class Watchdog:
    """This rank's hang watchdog (see the module doc); `start` once the process group is up, `close` at the end."""

    def __init__(self, timeout_s: float | None, ledger: Ledger = LEDGER, exit: Callable[[int], Any] = os._exit) -> None:
        self.timeout_s, self.ledger, self._exit = timeout_s, ledger, exit
        ledger.reset()  # a new session: positions count from here
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stacks_dir: str | None = None
        self.rank, self.world_size = 0, 1
        self._store: tdist.Store | None = None
        self._hang_dir: Callable[[], Path] = lambda: Path(".")
        self._last_good: Callable[[], str | None] = lambda: None
        self._published = False
        self._mine: dict[str, Any] = {}
        self._complete_once = False

    def start(self, *, rank: int, world_size: int, store: tdist.Store | None, hang_dir: Callable[[], Path], last_good: Callable[[], str | None]) -> None:
        if self.timeout_s is None or self._thread is not None:
            return
        self.rank, self.world_size, self._store, self._hang_dir, self._last_good = rank, world_size, store, hang_dir, last_good
        self._stacks_dir = tempfile.mkdtemp(prefix="distrib-stacks-")  # private (0700): workers' stack files
        workers.set_stacks_dir(self._stacks_dir)
        self.ledger.beat()
        self._thread = threading.Thread(target=self._watch, name="distrib-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        workers.set_stacks_dir(None)
        if self._stacks_dir is not None:
            shutil.rmtree(self._stacks_dir, ignore_errors=True)
            self._stacks_dir = None

    def _watch(self) -> None:
        assert self.timeout_s is not None
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            try:
                self._tick()
            except Exception as exc:  # a store gone at the job's end (or broken): the watchdog must not take the rank down
                if not self._stop.is_set():
                    log.warning(f"[watchdog] rank {self.rank}: the hang watchdog stops ({type(exc).__name__}: {exc})")
                return

    def _tick(self) -> None:
        assert self.timeout_s is not None
        store, key = self._store, f"distrib/hang/report/{self.rank}"
        stalled = time.monotonic() - self.ledger.moved
        if self.ledger.busy is not None or stalled < self.timeout_s:
            if self._published:
                self._published = self._complete_once = False
                if store is not None:
                    store.delete_key(key)
            return
        if not self._published:
            mine = report(self.rank, stalled, self.ledger)
            self._published, self._mine = True, mine
            log.error(
                f"[watchdog] rank {self.rank}: no progress for {stalled:.0f} s (train.hang_timeout_s={self.timeout_s:g}): {place(mine)}; in {frame_of(mine)}"
            )
            if store is not None:
                store.set(key, json.dumps(mine))
        if store is not None and store.check(["distrib/hang/verdict"]):
            self._end(f"rank {self.rank}: ending with the job: rank 0 found it hung ({store.get('distrib/hang/verdict').decode()})")
        if self.rank == 0:
            self._judge()

    def _judge(self) -> None:
        """Rank 0: once every rank's report has stood for two checks, write the verdict and end the job (one process: say it)."""
        store = self._store
        if store is None:
            # One process: no peer waits for it, and a debugger's breakpoint looks the same as a hang.
            # Say where it is, once per stall, and let it be.
            if not self._complete_once:
                self._complete_once = True
                text, _ = verdict([self._mine])
                log.warning(f"[watchdog] {text}\nIts stacks are in {self._write(text, [self._mine])}/; one process keeps waiting.")
            return
        keys = [f"distrib/hang/report/{r}" for r in range(self.world_size)]
        if not store.check(keys):
            self._complete_once = False
            return
        if not self._complete_once:  # a rank that has just moved on withdraws its report within a check
            self._complete_once = True
            return
        reports = [json.loads(store.get(k)) for k in keys]
        text, _ = verdict(reports)
        where = self._write(text, reports)
        error = HangError(
            f"no rank made progress for train.hang_timeout_s={self.timeout_s:g} s: {text}\nEvery rank's stacks are in {where}/. "
            "HINT: fix the frame named above; if that phase is legitimately slow, raise --train.hang_timeout_s.",
            last_good=self._last_good(),
        )
        store.set("distrib/hang/verdict", str(where))
        self._end(error, grace_s=2.0)

    def _write(self, text: str, reports: list[dict[str, Any]]) -> Path:
        """`run.dir/hang-<time>/`: the verdict and each rank's stacks (its DataLoader workers' too)."""
        where = self._hang_dir()
        (where / VERDICT_FILE).write_text(text + "\n")
        for r in reports:
            lines = [f"rank {r['rank']}: {frame_of(r)}: {place(r)}; no progress for {r['stalled_s']} s", *r["threads"]]
            for pid, stack in r["workers"].items():
                lines += ["", f"DataLoader worker pid {pid} (faulthandler, most recent call first):", stack.rstrip()]
            (where / f"rank-{r['rank']:05d}.txt").write_text("\n".join(lines) + "\n")
        return where

    def _end(self, error: HangError | str, grace_s: float = 0.0) -> None:
        """Print the error and exit 1 now: the main thread is stuck and cannot be asked to."""
        error_exit(error if isinstance(error, HangError) else HangError(error))
        for h in log.handlers:
            h.flush()
        sys.stdout.flush()
        time.sleep(grace_s)  # rank 0 hosts the store under some launchers: let the others read the verdict first
        workers.kill_workers()
        if self._stacks_dir is not None:
            shutil.rmtree(self._stacks_dir, ignore_errors=True)
        self._exit(1)  # os._exit: no cleanup may wait on the stuck main thread
