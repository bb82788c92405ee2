"""Atomic file writes: readers see the old file or the new one, never half of either.

distrib writes only what it created: a path that is a symbolic link or not a regular file (a
device, a FIFO, a directory) is refused, never written through or replaced (`check_own`), and
temporary files are created exclusively, without following links. A failed write (a full disk, a
directory removed or made read-only) is a `StorageError` naming the path, the cause and the fix.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distrib.errors import ConfigError, StorageError

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def check_own(path: Path, hint: str = "HINT: remove it, or choose another path.") -> None:
    """Refuse (ConfigError, exit 2) a `path` that exists as a link or anything but a regular file.

    distrib never follows or replaces what it did not create: a planted link would make it
    overwrite the link's target (as root: any file), and a rename over a device node replaces it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise storage_error(path, exc) from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(
            f"{path} is a symbolic link (to {os.readlink(path)!r}) that distrib did not create; distrib never writes through or over a link. {hint}"
        )
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise ConfigError(f"{path} is {kind}, not a regular file; distrib writes only files it creates. {hint}")


def foreign_dir(path: Path) -> str | None:
    """What `path` is if it is not a plain directory distrib may write into (a link, a file), else None (absent too)."""
    if path.is_symlink():
        return f"a symbolic link (to {os.readlink(path)!r}) that distrib did not create"
    if path.exists() and not path.is_dir():
        return "not a directory"
    return None


def open_own(path: Path, *, append: bool, hint: str = "HINT: remove it, or choose another path.") -> Any:
    """Open `path` for unbuffered binary writing (append, or truncate), never through a link or into a non-file."""
    check_own(path, hint)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link planted between the check and the open
            check_own(path, hint)
        raise storage_error(path, exc) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        check_own(path, hint)
    return open(fd, "ab" if append else "wb", buffering=0)


def storage_error(path: Path, exc: OSError, needed: int | None = None) -> StorageError:
    """A failed write as a message a user can act on: the path, the cause, and for a full disk the space."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        room = f"{'needed about ' + _mib(needed) + ', ' if needed else ''}{_mib(free) + ' free' if free is not None else 'free space unknown'}"
        return StorageError(
            f"the disk is full writing {path} ({room}; {exc.strerror}). HINT: free space on that file system (older checkpoints "
            "in run.dir/checkpoints/ may go, but keep the last good one), or point --run.dir at a larger disk."
        )
    cause = exc.strerror or str(exc)
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        hint = "a directory of the run was removed or replaced while it ran. HINT: leave run.dir alone while a run writes it."
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "the run directory is not writable any more. HINT: make it writable again (or pass another --run.dir)."
    elif exc.errno == errno.EXDEV:
        hint = "it is on another file system than the run directory. HINT: keep run.dir and everything in it on one file system."
    else:
        hint = "HINT: check the file system (dmesg, df -h)."
    return StorageError(f"cannot write {path}: {cause}; {hint}")


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def payload_bytes(obj: Any) -> int:
    """The bytes of the tensors in `obj` (a nested structure): about the size of its torch.save file."""
    from torch.utils._pytree import tree_leaves

    seen: set[int] = set()
    total = 0
    for leaf in tree_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            key = leaf.untyped_storage().data_ptr() if leaf.device.type != "meta" else id(leaf)
            if key not in seen:
                seen.add(key)
                total += leaf.untyped_storage().nbytes()
    return total


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry, not just the file data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crc32_hex(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


class _Checksummed:
    """A write-only file that checksums what passes through it (one pass: no re-read to checksum).

    CRC-32, as zip and gzip use: it detects the truncation and bit rot a checkpoint must survive at
    a third of sha256's CPU, which matters because a save's CPU is taken from training.
    """

    def __init__(self, f: Any) -> None:
        self.f, self.crc, self.written = f, 0, 0
        self.error: OSError | None = None  # torch.save hides a writer's OSError behind its own RuntimeError

    def write(self, data: Any) -> int:
        self.crc = zlib.crc32(data, self.crc)
        try:
            n = self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.written += n
        return n

    def flush(self) -> None:
        self.f.flush()


def _atomic(path: Path, fill: Callable[[Any], None], needed: Callable[[], int] | None = None) -> str:
    """`fill` a temporary file, flush, fsync, rename it over `path`; on failure remove the temporary.

    Returns the CRC-32 of the bytes written (hex). `path` must be a regular file or absent
    (`check_own`); an OSError, also one torch.save wraps, becomes a `StorageError`.
    """
    check_own(path)
    tmp = path.with_name(f".{path.name}.part{os.getpid()}")
    out = None
    try:
        check_own(tmp)  # a crashed attempt's leftover is ours to replace; a link is not
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "wb") as f:
            out = _Checksummed(f)
            fill(out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        cause = out.error if out is not None and out.error is not None else exc
        if isinstance(cause, OSError) and not isinstance(cause, StorageError):
            written = out.written if out is not None else 0
            raise storage_error(path, cause, needed=max(written, needed() if needed else 0) or None) from None
        raise
    return crc32_hex(out.crc)


def write_atomic(path: Path, data: bytes) -> str:
    """Write `data` atomically to `path`; returns its CRC-32."""
    return _atomic(path, lambda f: f.write(data), lambda: len(data))


def save_torch(path: Path, obj: Any) -> str:
    """torch.save `obj` atomically to `path`; returns the file's CRC-32.

    Streamed to a temporary file (no in-memory copy of the whole file) and checksummed on the way,
    so a checkpoint's manifest needs no second read of it; a failure leaves no file under `path`.
    """
    return _atomic(path, lambda f: torch.save(obj, f), lambda: payload_bytes(obj))
