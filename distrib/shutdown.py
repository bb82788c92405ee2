"""A quicker interpreter exit for distrib's own commands (`python -m distrib.train`, `distrib ...`).

CPython's shutdown tears the modules down and runs the cycle collector over every object still
alive, more than once. With torch loaded that is most of the exit: about 0.35 s of CPU after a bare
`import torch` and 0.4-0.7 s after a training run (perf: `gc_collect_main`), paid by every rank on
every launch, and on a shared CPU taken from the other ranks still training.

So, at exit, collect the garbage there is (its finalisers run, as they would have), then
`gc.freeze()` what is still alive: the shutdown's collections skip it. atexit handlers,
`weakref.finalize` callbacks, the flush of stdout and stderr and the freeing of everything
reference counting frees all still happen. What is skipped are the finalisers of objects that are
alive at exit and in a reference cycle, which Python does not promise to run anyway (the data model's
`__del__` note). Spack does the same in its entry point (spack/spack#53020).

Only distrib's own commands do this: a script that calls `fit` or `distrib.main` owns its process,
and its exit stays Python's.
"""

from __future__ import annotations

import atexit
import gc

_registered = False


def _collect_then_freeze() -> None:
    gc.collect()
    gc.freeze()


def quick_exit() -> None:
    """Register, once, the collect-then-freeze at exit (a command's `main` calls it first)."""
    global _registered
    if not _registered:
        atexit.register(_collect_then_freeze)
        _registered = True
