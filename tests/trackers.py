"""Trackers that misbehave, for the tests that show a tracker can neither slow nor fail the job."""

from __future__ import annotations

import time
from typing import Any


class HangsInLog:
    """Its first log call never returns (a server that stops answering mid-run)."""

    def log(self, record: dict[str, Any]) -> None:
        time.sleep(3600)


class RaisesInLog:
    def log(self, record: dict[str, Any]) -> None:
        raise RuntimeError("the tracker's server said no")


class Mutates:
    """Edits the records it gets: no other tracker may see the edits."""

    def log(self, record: dict[str, Any]) -> None:
        record.pop("loss", None)
        record["step"], record["kind"] = -1, "mutated"


class Crashes:
    """Takes the whole trackers' process down with it (as a segfault in a native library would)."""

    def log(self, record: dict[str, Any]) -> None:
        import os

        os._exit(9)
