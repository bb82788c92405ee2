"""Error types users see. Every message says what was set, what was expected, and the fix."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class DistribError(Exception):
    """Base class for errors raised by distrib."""

    exit_code = 2
    """The CLI's exit status for this error (2: bad input, nothing was lost)."""


class ConfigError(DistribError, ValueError):
    """A config value, CLI flag or config file is invalid."""


class EnvironmentConfigError(DistribError, RuntimeError):
    """The launcher's environment variables are inconsistent."""


class BatchError(DistribError, TypeError):
    """A batch is not a structure of tensors that distrib can move and split."""


class PeerError(DistribError, RuntimeError):
    """A collective failed or timed out: another rank died or hangs. Not a bad input, so exit status 1."""

    exit_code = 1


class RendezvousError(DistribError, RuntimeError):
    """The process group could not be formed (a peer never came, an address that does not resolve, a port in use). Exit 1."""

    exit_code = 1


class FaultError(DistribError, RuntimeError):
    """A run failed after it started (exit 1): the message ends with the checkpoint a rerun resumes from.

    Nothing committed is lost: every file is written whole or not at all. The session adds the last
    good checkpoint to the message (`last_good`; "" when there is none).
    """

    exit_code = 1

    def __init__(self, message: str, *, last_good: str | None = None) -> None:
        super().__init__(message)
        self.last_good = last_good

    def __str__(self) -> str:
        text = self.args[0] if self.args else ""
        if self.last_good:
            text += f" The last good checkpoint is {self.last_good}: run the same command again to resume from it."
        elif self.last_good == "":
            text += " No good checkpoint is left in run.dir: a rerun starts afresh."
        return text


class StorageError(FaultError):
    """Writing the run's files failed (a full disk, a directory removed or made read-only mid-run). Exit 1."""


class NonFiniteError(FaultError):
    """An optimizer step's gradients were not finite (`train.nonfinite`); no checkpoint holds them. Exit 1."""


class HangError(FaultError):
    """No rank made progress for `train.hang_timeout_s`; the message names the rank holding the others up. Exit 1."""


def error_exit(error: DistribError | str, exit_code: int | None = None) -> int:
    """Print `distrib: error: <message>` on stderr and return the exit status for a command to return.

    Every command reports bad input and faults this way: the message says what was set and the fix
    (`HINT: ...`), never a traceback. The status is `exit_code`, else the error's own (2 for a string).
    """
    print(f"distrib: error: {error}", file=sys.stderr, flush=True)
    if exit_code is not None:
        return exit_code
    return error.exit_code if isinstance(error, DistribError) else DistribError.exit_code


class CommandParser(argparse.ArgumentParser):
    """argparse for distrib's commands: a bad argument is `distrib: error: ... HINT: ...`, exit 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise SystemExit(error_exit(f"{self.prog}: {message}. HINT: `{self.prog} --help` lists the arguments."))
