"""Checkpoint storage: atomic, verified, newest-good-first.

Layout (one directory per checkpoint, `<run.dir>/checkpoints/step-000000123/`):
  state.pt          replicated state, written once by rank 0 (model, optimizer, scheduler, ...)
  rank-00000.pt     per-rank state (RNG), one per rank
  sharded/          dist.strategy=fsdp only: models and optimizers as DCP shards, one file per rank
                    (`__<rank>_0.distcp`) and `.metadata`; state.pt then holds the rest
  MANIFEST.json     written last: the format version, each file's size and CRC-32 (taken while
                    writing), the step and world size

Format versions (`FORMAT`, in the manifest): 1 had no `format` key (written before December 2026);
2 adds it. A checkpoint of an older format resumes, with defaults for what it lacks; one of a newer
format than this distrib knows is refused (exit 2), naming both versions and the fix.

A checkpoint exists only once its directory has its final name *and* its manifest verifies. Files
are written to a temporary name, flushed, fsynced and renamed; the directory is assembled under a
temporary name and renamed into place after the manifest. A crash or an OSError (a full disk) at
any point leaves at most a `.tmp` directory, which loading ignores, so the previous checkpoint
stays the newest good one. A truncated or corrupted file fails its checksum at load time and the
loader falls back to the previous checkpoint, saying so.

This module is storage only; which ranks write what, and the barriers between them, belong to
the caller (rank 0 writes `state.pt` and the manifest, every rank its own `rank-*.pt`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

from distrib.checkpoint.fileio import crc32_hex, foreign_dir, fsync_dir, storage_error, write_atomic
from distrib.runtime.console import log

MANIFEST = "MANIFEST.json"
FORMAT = 2
"""The checkpoint format this distrib writes (see the module doc for what each version holds)."""
_STEP_DIR = re.compile(r"step-(\d{9})")
_PART = re.compile(r"\..+\.part\d+")  # distrib.checkpoint.fileio.write_atomic's temporary names


class CheckpointError(RuntimeError):
    """A checkpoint failed verification."""


class NewerFormatError(CheckpointError):
    """A checkpoint written by a newer distrib, in a format this one does not know."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:09d}"


def staging_dir(root: Path, step: int) -> Path:
    """Where a checkpoint is assembled before it is renamed into place (ignored by loading)."""
    return root / f"step-{step:09d}.tmp"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc32_hex(crc)


# Manifest checksums: CRC-32 since distrib writes it while saving (a third of sha256's CPU); sha256
# in checkpoints written before, which still verify.
_CHECKSUMS = {"crc32": _crc32, "sha256": _sha256}


def begin(root: Path, step: int) -> Path:
    """Create a clean staging directory for `step` (rank 0, before a barrier)."""
    check_root(root, mid_run=True)
    staging = staging_dir(root, step)
    if staging.exists():
        shutil.rmtree(staging)  # left by a crashed attempt
    staging.mkdir(parents=True)
    return staging


def commit(root: Path, step: int, *, world_size: int, keep: int, meta: dict[str, Any] | None = None, digests: dict[str, str] | None = None) -> Path:
    """Write the manifest last, rename the staging directory into place, prune to the last `keep`.

    Rank 0 only, after every rank has written its files (a barrier). `digests` are CRC-32s already
    known (taken while writing); every other file is read to checksum it.
    """
    digests = digests or {}
    staging = staging_dir(root, step)
    # Every file, in subdirectories too (an FSDP checkpoint's DCP shards, with their `.metadata`),
    # but not a write_atomic temporary left by a failed write.
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file() and not _PART.fullmatch(p.name))
    manifest = {
        "format": FORMAT,
        "step": step,
        "world_size": world_size,
        "files": {name: {"size": (staging / name).stat().st_size, "crc32": digests.get(name) or _crc32(staging / name)} for name in files},
        **(meta or {}),
    }
    write_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    final = step_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_dir(root)
    prune(root, keep, upto=step)
    return final


def verify(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint `path` if every file it lists has its size and checksum; else raise."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: no readable {MANIFEST} ({exc})") from None
    _check_manifest(path, manifest)
    for name, want in manifest["files"].items():
        f = path / name
        if f.is_symlink() or not f.is_file():
            raise CheckpointError(f"{path}: {name} is {'a symbolic link' if f.is_symlink() else 'missing'}")
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{path}: {name} has {size} bytes, the manifest says {want['size']} (truncated?)")
        kind = next((k for k in _CHECKSUMS if k in want), None)
        if kind is None:
            raise CheckpointError(f"{path}: the manifest gives {name} no checksum")
        if _CHECKSUMS[kind](f) != want[kind]:
            raise CheckpointError(f"{path}: {name} fails its {kind} (corrupted)")
    return manifest


def _check_manifest(path: Path, manifest: Any) -> None:
    """The manifest must say which format, step and world size, and list every file a resume reads."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: {MANIFEST} is not a JSON object")
    version = manifest.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: {MANIFEST} gives format {version!r}, not a version number")
    if version > FORMAT:
        raise NewerFormatError(f"{path} is in checkpoint format {version}, written by a newer distrib; this one reads formats 1 to {FORMAT}")
    for key in ("step", "world_size"):
        if not isinstance(manifest.get(key), int) or isinstance(manifest.get(key), bool) or manifest[key] < 0:
            raise CheckpointError(f"{path}: {MANIFEST} gives no {key}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("size"), int) for v in files.values()):
        raise CheckpointError(f"{path}: {MANIFEST} lists no files with their sizes")
    needed = ["state.pt", *(rank_file(r) for r in range(manifest["world_size"]))]
    missing = [name for name in needed if name not in files]
    if missing:
        raise CheckpointError(f"{path}: {MANIFEST} does not list {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, which a resume reads")


def check_root(root: Path, *, mid_run: bool = False) -> None:
    """Refuse a `checkpoints/` that is a link or not a directory: distrib never writes through what it did not make.

    Before the run: bad input (ConfigError, exit 2). `mid_run`: something replaced it under the run (StorageError, exit 1).
    """
    what = foreign_dir(root)
    if what is not None:
        from distrib.errors import ConfigError, StorageError

        if mid_run:
            raise StorageError(
                f"cannot write {root}: it is {what} any more; something replaced it under the run. HINT: leave run.dir alone while a run writes it."
            )
        raise ConfigError(f"{root} is {what}; checkpoints are written only into a directory of the run's own. HINT: remove it, or pass another --run.dir.")


def candidates(root: Path) -> list[Path]:
    """Committed checkpoint directories, newest first (staging `.tmp` directories and links are not listed)."""
    if not root.is_dir() or root.is_symlink():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_good(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, reporting (and skipping) any newer broken ones."""
    for path in candidates(root):
        try:
            return path, verify(path)
        except NewerFormatError:
            raise  # not broken: falling back to an older one would silently drop its progress
        except CheckpointError as exc:
            log.warning(f"checkpoint {path.name} is not usable: {exc}; trying the previous one")
    return None


def prune(root: Path, keep: int, upto: int | None = None) -> None:
    """Delete all but the newest `keep` checkpoints at or below step `upto` (the one just committed).

    A directory with a higher step is not this run's (junk, or a copy): it neither takes a slot
    nor is deleted, so it can never push this run's good checkpoints out.
    """
    mine = [p for p in candidates(root) if upto is None or int(_STEP_DIR.fullmatch(p.name).group(1)) <= upto]  # type: ignore[union-attr]
    for old in mine[keep:]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- RNG state


def capture_rng() -> dict[str, Any]:
    """This rank's RNG states as plain data (loadable with weights_only=True): python, numpy, torch, CUDA."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_file(path: Path, *, mmap: bool = False) -> Any:
    """A checkpoint file as data: `weights_only=True`, so a planted pickle cannot run code.

    `mmap`: tensors stay in the file until read (a model's weights read row by row, `weights.py`)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        from distrib.errors import ConfigError

        first = str(exc).strip().splitlines()[0][:300]
        raise ConfigError(
            f"{path} holds more than plain data (tensors, numbers, strings, lists, dicts), so distrib will not load it: "
            f"{first}. HINT: checkpoint only state_dicts and plain values; a file someone else planted is refused on purpose."
        ) from None


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint directory to resume from: `never` -> None, `auto` -> newest good, else a path."""
    from distrib.errors import ConfigError

    if resume == "never":
        return None
    check_root(root)  # before anything is read through it
    try:
        if resume == "auto":
            found = newest_good(root)
            if found is None and candidates(root):
                names = ", ".join(p.name for p in candidates(root))
                raise ConfigError(
                    f"{root} holds checkpoints ({names}) and none is usable (see the warnings above); starting afresh would "
                    f"lose them, so nothing was changed. HINT: --ckpt.resume never starts afresh and keeps them in "
                    f"{root.parent}/previous/, or pass another --run.dir."
                )
            return found[0] if found else None
        path = Path(resume)
        verify(path)
        return path
    except NewerFormatError as exc:
        raise ConfigError(
            f"cannot resume: {exc}. HINT: resume it with the distrib that wrote it (or a newer one: "
            "pip install -U distrib), or start fresh with --ckpt.resume never."
        ) from None
    except CheckpointError as exc:
        raise ConfigError(f"ckpt.resume={resume!r} is not a usable checkpoint: {exc}. HINT: pass --ckpt.resume auto to use the newest good one.") from None


def save(
    root: Path,
    step: int,
    *,
    rank: int,
    world_size: int,
    keep: int,
    shared: dict[str, Any] | None,
    per_rank: dict[str, Any],
    sharded: dict[str, Any] | None = None,
    group: Any = None,
) -> None:
    """Write one checkpoint from every rank: rank 0 the replicated `shared` state, each rank its own
    and its shard of `sharded` (DCP, into `sharded/`).

    Barriers (on `group`, the default process group if None) order the phases so no rank writes
    into a directory that is not ready and the manifest is written only after every rank's file is
    on disk. `shared` is only read on rank 0.
    """
    from functools import partial

    from distrib.checkpoint.fileio import save_torch
    from distrib.runtime.collectives import barrier as barrier_on

    barrier = partial(barrier_on, group)

    leader = rank == 0
    if leader:
        try:
            begin(root, step)
        except OSError as exc:
            raise storage_error(Path(exc.filename) if exc.filename else root, exc) from None
    barrier()
    staging = staging_dir(root, step)
    digests = {rank_file(rank): save_torch(staging / rank_file(rank), per_rank)}
    if sharded:
        from distrib.checkpoint.sharded import SHARDED_DIR, save_sharded

        save_sharded(staging / SHARDED_DIR, sharded, group)
    if leader:
        digests["state.pt"] = save_torch(staging / "state.pt", shared)
    barrier()
    if leader:
        try:
            commit(root, step, world_size=world_size, keep=keep, digests=digests)
        except OSError as exc:  # e.g. checkpoints/ deleted under the save
            raise storage_error(Path(exc.filename) if exc.filename else staging, exc) from None
    barrier()
