"""This rank's position, for the hang watchdog: where in the loop it is, and which collective it is in.

When a rank stops making progress, the others soon wait for it inside a collective; every rank's
watchdog then fires, and a verdict compares their positions (`distrib/observe/hang.py`). The ledger
is what each rank reports: the micro-batch it is on and the phase of it (fetching, computing,
backward, optimizer step, eval, ...), and every collective distrib issues, numbered per rank with its
op, shapes and the caller's line (`collective`). A count per call site shows which rank skipped one.

Updates are attribute stores (and, per collective, one walk up the stack to the caller): the
per-step path pays nothing measurable and no host sync. There is one ledger per process (`LEDGER`),
as there is one process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

PHASES = ("starting", "fetching a batch", "computing (forward/backward)", "backward", "optimizer step", "evaluating", "ending")
"""A micro-batch's phases in the order a rank goes through them: positions compare by (micro-batch, phase)."""
STARTING, FETCHING, COMPUTING, BACKWARD, STEPPING, EVALUATING, ENDING = range(len(PHASES))

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # distrib/
# Frames a call site looks through: the collectives themselves, and the Session verbs that only pass
# a user's call on (so an own loop's `session.all_reduce` is named by the user's line, fit's by distrib's).
_LIBRARY = tuple(os.path.join(p, "") for p in {*(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")), _PACKAGE})
_THROUGH = (os.path.join(_PACKAGE, "runtime", ""), os.path.join(_PACKAGE, "loop", "session.py"), contextlib.__file__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Collective:
    """One collective distrib issued: its number on this rank, op, shapes and the line that asked for it."""

    seq: int
    op: str
    shapes: str
    site: str
    """`file:line function` of the caller: the user's line, or distrib's own (`caller_site`)."""


class Ledger:
    """Where this rank is (see the module doc). `moved` is the monotonic time of its latest progress."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new session's ledger."""
        self.moved = time.monotonic()
        self.micro = 0
        """Training micro-batches handed out in this process: equal on every rank at the same point."""
        self.phase = STARTING
        self.sub = 0
        """Within the phase: the eval batch."""
        self.step = 0
        """Optimizer steps taken (counted on from a resumed run's step)."""
        self.seq = 0
        self.sites: Counter[str] = Counter()
        self.inside: Collective | None = None
        self.busy: str | None = None
        """A phase that is progress however long it takes (a checkpoint save, a compile): no stall is counted."""
        self.step_begins: Callable[[], None] | None = None
        """Called as the first micro-batch of an optimizer step is fetched (train.profile's trace marks steps from there)."""
        self._in_step = False

    def at(self, phase: int, sub: int = 0) -> None:
        """This rank moved on to `phase` (progress)."""
        self.phase, self.sub, self.moved = phase, sub, time.monotonic()

    def beat(self) -> None:
        """Progress within the current phase."""
        self.moved = time.monotonic()

    def stepping(self, step: int) -> None:
        """The optimizer step that makes `step` steps taken."""
        self.step = step
        self._in_step = False
        self.at(STEPPING)

    def next_micro(self) -> None:
        """The train loader is fetching the next micro-batch."""
        self.micro += 1
        if not self._in_step:
            self._in_step = True
            if self.step_begins is not None:
                self.step_begins()
        self.at(FETCHING)

    @contextlib.contextmanager
    def collective(self, op: str, *tensors: Any) -> Iterator[None]:
        """Number a collective this rank enters and note it as where the rank is until it returns."""
        self.seq += 1
        site = caller_site()
        self.sites[site] += 1
        shapes = ", ".join("x".join(map(str, t.shape)) or "scalar" for t in tensors if hasattr(t, "shape"))
        self.inside = Collective(seq=self.seq, op=op, shapes=shapes or "object", site=site)
        self.beat()
        try:
            yield
        finally:
            self.inside = None
            self.beat()

    @contextlib.contextmanager
    def busy_with(self, what: str) -> Iterator[None]:
        """A phase that may legitimately outlast `train.hang_timeout_s` (nested: the outermost names it)."""
        outer = self.busy
        self.busy = outer or what
        try:
            yield
        finally:
            self.busy = outer
            self.beat()

    def track_compiles(self) -> None:
        """torch.compile's compiles are progress however long they take (dynamo's callbacks are per process: set once)."""
        if self._compiles_tracked:
            return
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._compile_started)
        callback_handler.register_end_callback(self._compile_ended)
        Ledger._compiles_tracked = True

    _compiles_tracked = False
    _COMPILING = "compiling (torch.compile)"

    def _compile_started(self, _: Any) -> None:
        self.busy = self.busy or self._COMPILING

    def _compile_ended(self, _: Any) -> None:
        if self.busy == self._COMPILING:
            self.busy = None
        self.beat()

    def position(self) -> dict[str, Any]:
        """What the watchdog reports (plain values, for JSON)."""
        inside = dataclasses.asdict(self.inside) if self.inside is not None else None
        return {"micro": self.micro, "phase": self.phase, "sub": self.sub, "step": self.step, "seq": self.seq, "inside": inside, "sites": dict(self.sites)}


def user_file(filename: str) -> bool:
    """Whether a frame's file is the user's: not Python's own, an installed package's or distrib's."""
    return not os.path.abspath(filename).startswith(_LIBRARY)


def caller_site() -> str:
    """`file:line function` of the code that asked for a collective: the user's line, or distrib's own."""
    frame: Any = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_THROUGH):
        frame = frame.f_back
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"


LEDGER = Ledger()
