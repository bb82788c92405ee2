"""Atomic file writes: readers see the old file or the new one, never half of either."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry, not just the file data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary name, flush, fsync, rename over `path`; on failure remove the temporary."""
    tmp = path.with_name(f".{path.name}.part{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_torch(path: Path, obj: Any) -> None:
    """torch.save `obj` atomically (serialised in memory first, so a failure leaves no partial file)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())
