"""A quicker interpreter exit for distrib's own commands (`python -m distrib.train`, `distrib ...`).

CPython's shutdown tears the modules down and runs the cycle collector over every object still
alive. With torch loaded that is most of the exit: about 0.35 s of CPU after a bare `import torch`
and 0.4-0.7 s after a training run (perf: `gc_collect_main`), paid by every rank on every launch,
and on a shared CPU taken from the ranks still training.

So, at exit: collect the garbage there is (its finalisers run, as they would have), flush every
open file but stdout and stderr, then `gc.freeze()` what is still alive, so the shutdown's
collections skip it. atexit handlers, `weakref.finalize` callbacks, Python's own flush of stdout
and stderr and the freeing of whatever
reference counting frees all still happen. Skipped are the finalisers of what only those
collections would have freed: objects alive at exit in a reference cycle, and what only they hold
(a class attribute, an object that refers to itself). Python does not promise to run those (the
data model's `__del__` note); the flush keeps a file left open there from losing its buffered
writes, but a wrapper that writes on close (a gzip trailer, a temporary file's removal) is not
closed. Spack's entry point does the same (spack/spack#53020).

Only the commands do this (`command` in `distrib.train`, `distrib.cli`, `distrib.slurm`), not
their `main(argv)` nor `fit` or `distrib.main`: a script owns its process, and its exit stays
Python's unless it calls `quick_exit()`.
"""

from __future__ import annotations

import atexit
import gc
import io
import sys
from collections.abc import Callable

_registered = False
# Exact types (not isinstance): the scan visits every object alive, and an isinstance check reads
# `__class__`, which some torch modules answer with a deprecation warning.
_FILES = frozenset({io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper})


def _collect_flush_freeze() -> None:
    gc.collect()
    # stdout and stderr are left to Python's exit, which flushes them after this and reports a
    # failure (a full disk, a closed pipe) with exit status 120; a failure here would hide it.
    std = {id(f) for f in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    for obj in gc.get_objects():
        if type(obj) in _FILES and id(obj) not in std:
            try:
                if not obj.closed and obj.writable():
                    obj.flush()
            except (OSError, ValueError) as exc:  # reported as Python's exit reports a file it fails to flush
                print(f"Exception ignored while flushing {obj!r} at exit: {exc!r}", file=sys.stderr)
    gc.freeze()


def quick_exit() -> None:
    """Register, once, the collect-flush-freeze at exit; call it first thing in a script's entry point."""
    global _registered
    if not _registered:
        atexit.register(_collect_flush_freeze)
        _registered = True


def command(main: Callable[[], int]) -> Callable[[], int]:
    """`main` as a process's entry point (a console script, `python -m`): the quick exit, then `main()`."""

    def entry() -> int:
        quick_exit()
        return main()

    return entry
