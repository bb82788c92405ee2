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
