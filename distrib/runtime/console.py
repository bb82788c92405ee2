"""The console: rank 0 logs INFO; other ranks print only warnings and errors, prefixed with their rank,
so a Slurm log never shows eight copies of every line."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("distrib")


def setup_console(rank: int, world_size: int) -> None:
    """Rank 0 logs INFO; other ranks WARNING and up, each line prefixed with the rank."""
    prefix = f"[rank{rank}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
