"""Atomic file writes: readers see the old file or the new one, never half of either."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Callable

import torch


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
        self.f, self.crc = f, 0

    def write(self, data: Any) -> int:
        self.crc = zlib.crc32(data, self.crc)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _atomic(path: Path, fill: Callable[[Any], None]) -> str:
    """`fill` a temporary file, flush, fsync, rename it over `path`; on failure remove the temporary.

    Returns the CRC-32 of the bytes written (hex).
    """
    tmp = path.with_name(f".{path.name}.part{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            out = _Checksummed(f)
            fill(out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return crc32_hex(out.crc)


def write_atomic(path: Path, data: bytes) -> str:
    """Write `data` atomically to `path`; returns its CRC-32."""
    return _atomic(path, lambda f: f.write(data))


def save_torch(path: Path, obj: Any) -> str:
    """torch.save `obj` atomically to `path`; returns the file's CRC-32.

    Streamed to a temporary file (no in-memory copy of the whole file) and checksummed on the way,
    so a checkpoint's manifest needs no second read of it; a failure leaves no file under `path`.
    """
    return _atomic(path, lambda f: torch.save(obj, f))
