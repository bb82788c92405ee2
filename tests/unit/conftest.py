"""The unit suite is the inner loop: no test here may start a process.

Starting one (subprocess, multiprocessing, torch.multiprocessing, DataLoader workers, os.fork) fails
the test at once, naming what it tried; a test that needs real processes belongs in tests/e2e.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from typing import Any, NoReturn

import pytest


def _refuse(what: str) -> NoReturn:
    raise RuntimeError(f"unit tests start no process ({what}); move this test to tests/e2e")


@pytest.fixture(autouse=True)
def _no_process_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    def popen(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse(f"subprocess {args[0] if args else kwargs.get('args')!r}")

    def start(self: Any) -> NoReturn:
        _refuse(f"multiprocessing {type(self).__name__}")

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)
    monkeypatch.setattr(os, "fork", lambda: _refuse("os.fork"))
