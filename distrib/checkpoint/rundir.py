"""The run directory's ownership: one run writes it at a time, and nothing of a previous run is lost.

- `check_run_dir`: before anything is written, run.dir must be a directory this user can create
  and write (not a file, not under a file, not read-only).
- `RunLock`: rank 0 holds an exclusive POSIX record lock (`lockf`) on `run.dir/.distrib.lock` for the run's life. A
  second run on the same directory is refused at once, naming the holder (host, pid, start).
  The kernel drops the lock when its holder dies, however it dies, so a lock file left by a
  killed run is taken over with a note. The lock file is removed when the run ends.
- `set_aside`: `--ckpt.resume never` in a directory that holds a previous run moves that run's
  files into `run.dir/previous/<time>/` instead of mixing (or deleting) them.

A POSIX lock, not `flock`: it belongs to the process, so DataLoader workers forked from rank 0 do not
inherit it (a worker that outlives a killed rank by a second would otherwise hold the lock), and
NFS and Lustre implement it. A file system mounted without locks makes every run look like the only one.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

from distrib.checkpoint.fileio import check_own, foreign_dir, storage_error
from distrib.errors import ConfigError
from distrib.runtime.console import log
from distrib.runtime.stop import STOPPED_FILE

LOCK_FILE = ".distrib.lock"
PREVIOUS_DIR = "previous"
METRICS_FILE = "metrics.jsonl"
"""One JSON line per log interval and eval (rank 0 writes it; a resume cuts it back to its checkpoint)."""
CONFIG_FILE = "config.json"
"""The run's whole config, as resolved (defaults, file and flags)."""
SUMMARY_FILE = "summary.json"
"""Written at the end of a finished run: steps, samples, the last eval, params_sha256."""
MODEL_FILE = "model.pt"
"""The plain module's state_dict at the end of a finished run."""
HF_CONFIG_FILE = "hf_config.json"
"""A Hugging Face model's own config, recorded when one is set up (`distrib export --format hf` writes it as config.json)."""
CSV_FILE = "metrics.csv"
"""metrics.jsonl's records as rows (`run.report_to csv`)."""
TENSORBOARD_DIR = "tensorboard"
"""TensorBoard's event files (`run.report_to tensorboard`)."""
PROFILE_DIR = "profile"
"""train.profile's traces, one per rank, and on CUDA the memory snapshots."""
RUN_FILES = ("checkpoints", METRICS_FILE, CONFIG_FILE, SUMMARY_FILE, MODEL_FILE, STOPPED_FILE, HF_CONFIG_FILE, CSV_FILE, TENSORBOARD_DIR, PROFILE_DIR)
"""What a run leaves in its directory (a user's own files there are left alone)."""


def check_run_dir(run_dir: str | Path) -> None:
    """Raise ConfigError unless `run_dir` is, or can be made, a directory this process can write."""
    path = Path(run_dir)
    hint = "HINT: pass --run.dir a new or writable directory (e.g. runs/exp1)."
    too_long = [part for part in path.parts if len(os.fsencode(part)) > 255]
    if too_long:
        raise ConfigError(f"run.dir: the name {too_long[0][:40]!r}... has {len(os.fsencode(too_long[0]))} bytes; file systems allow 255. {hint}")
    # Room for the longest name a run writes inside (a checkpoint's staging file), under the system's limit.
    limit = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
    length = len(os.fsencode(os.path.abspath(path)))
    if length + 100 > limit:
        raise ConfigError(
            f"run.dir is {length} bytes long as an absolute path; with the files a run writes inside it, that passes the system's limit of {limit}. {hint}"
        )
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"run.dir={str(run_dir)!r} is a symbolic link to {os.readlink(path)!r}, which does not exist. {hint}")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run.dir={str(run_dir)!r} is a file, not a directory. {hint}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run.dir={str(run_dir)!r} cannot be created: {str(existing)!r} is a file. {hint}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir={str(run_dir)!r} is not writable: {str(existing)!r} is read-only for this user. {hint}")


class RunDirBusyError(ConfigError):
    """Another live run holds the run directory's lock."""


class RunLock:
    """Rank 0's exclusive hold on a run directory (see the module doc)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self._fd: int | None = None
        self._created = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        check_run_dir(self.dir)
        self._created = not self.dir.exists()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"run.dir={str(self.dir)!r} cannot be created: {exc.strerror}. HINT: pass --run.dir a writable directory.") from None
        path = self.dir / LOCK_FILE
        while True:
            check_own(path, "HINT: remove it, or pass another --run.dir.")  # a planted link would lock (and truncate) its target
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped in after the check
                    os.close(fd)
                    check_own(path, "HINT: remove it, or pass another --run.dir.")
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    check_own(path, "HINT: remove it, or pass another --run.dir.")
                raise ConfigError(
                    f"run.dir={str(self.dir)!r}: cannot create its lock file: {exc.strerror}. HINT: pass --run.dir a writable directory."
                ) from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirBusyError(
                    f"run.dir={str(self.dir)!r} is in use by another run ({_describe(holder)}); two runs on one directory would "
                    "mix their checkpoints and metrics. HINT: wait for that run to end (or stop it), or pass another --run.dir."
                ) from None
            # A holder removes the file as it ends: the file locked must still be the one at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read(fd)
        if previous:
            log.warning(f"run.dir {self.dir}: taking over the lock left by {_describe(previous)}, which is no longer running")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            (self.dir / LOCK_FILE).unlink(missing_ok=True)  # while still locked: see acquire's inode check
        except OSError:
            pass  # a directory made read-only under the run: the kernel drops the lock anyway, and the next run takes the file over
        finally:
            os.close(fd)
        if self._created:
            try:
                self.dir.rmdir()  # made only for the lock, and nothing else was written: leave no trace
            except OSError:
                pass


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not written its name yet"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def previous_run_files(run_dir: str | Path) -> list[Path]:
    """The files a previous run left in `run_dir`."""
    path = Path(run_dir)
    return [path / name for name in RUN_FILES if (path / name).exists()]


def set_aside(run_dir: str | Path, why: str = "ckpt.resume=never") -> Path | None:
    """Move a previous run's files into run.dir/previous/<time>/ (nothing is deleted); the new place, or None."""
    found = previous_run_files(run_dir)
    if not found:
        return None
    previous = Path(run_dir) / PREVIOUS_DIR
    what = foreign_dir(previous)
    if what is not None:
        raise ConfigError(
            f"{previous} is {what}; the previous run's files go there, and distrib never writes through a link. HINT: remove it, or pass another --run.dir."
        )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = Path(run_dir) / PREVIOUS_DIR / stamp
    n = 1
    while target.exists():
        n += 1
        target = Path(run_dir) / PREVIOUS_DIR / f"{stamp}-{n}"
    try:
        target.mkdir(parents=True)
        for f in found:
            os.replace(f, target / f.name)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise ConfigError(
                f"{previous} is on another file system than {run_dir}, so the previous run's files cannot be moved "
                "there by a rename (and distrib does not copy them). HINT: unmount or remove it, or pass another --run.dir."
            ) from None
        raise storage_error(target, exc) from None
    log.warning(f"{why}: the previous run's {', '.join(f.name for f in found)} moved to {target} (nothing deleted)")
    return target
