"""`distrib export CHECKPOINT --out model.pt`: a checkpoint's model as a plain `state_dict` file.

Works on both checkpoint formats: an FSDP checkpoint's DCP shards (any number of ranks) are read
and assembled in this one process; a DDP checkpoint's `state.pt` already holds the whole model.
The file loads with `torch.load(path, weights_only=True)` into the model, without distrib.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distrib.checkpoint import sharded
from distrib.checkpoint import store as checkpoint
from distrib.checkpoint.fileio import check_own, save_torch
from distrib.errors import CommandParser, ConfigError, DistribError, error_exit


def resolve(path: Path) -> Path:
    """`path` if it is a checkpoint; for a run directory (or its `checkpoints/`), the newest good checkpoint in it."""
    if (path / checkpoint.MANIFEST).exists():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = checkpoint.newest_good(root)
    return found[0] if found is not None else path


def model_state(path: Path, key: str = "model") -> dict[str, Any]:
    """The plain state_dict stored under `key` in checkpoint `path` (verified first)."""
    try:
        checkpoint.verify(path)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(f"{path} is not a usable checkpoint: {exc}. HINT: pass a directory like RUN_DIR/checkpoints/step-000000100.") from None
    shared = checkpoint.load_file(path / "state.pt")
    layout = shared.get("sharded", {}).get(key)
    if layout is not None and "shapes" in layout:  # a module's shards (an optimizer's layout has param_groups)
        return sharded.convert(path, key)
    objects = shared.get("objects", {})
    if key in objects and isinstance(objects[key], dict) and all(hasattr(v, "shape") for v in objects[key].values()):
        return objects[key]
    keys = sorted(
        k
        for k, v in {**objects, **shared.get("sharded", {})}.items()
        if isinstance(v, dict) and ("shapes" in v or v and all(hasattr(t, "shape") for t in v.values()))
    )
    raise ConfigError(f"{path} holds no model under {key!r} (its models: {', '.join(keys) or 'none'}). HINT: pass --key with one of those.")


def main(argv: Sequence[str] | None = None) -> int:
    p = CommandParser(prog="distrib export", description="Write a checkpoint's model (sharded or not) as one plain state_dict file.")
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory (RUN_DIR/checkpoints/step-000000100), or a run directory: its newest good one")
    p.add_argument("--out", type=Path, required=True, help="the .pt file to write (torch.load(..., weights_only=True) reads it)")
    p.add_argument("--key", default="model", help="the state key of the model in the checkpoint (fit's is `model`)")
    ns = p.parse_args(argv)
    if ns.out.is_dir():
        return error_exit(f"--out {str(ns.out)!r} is a directory. HINT: pass a file path, e.g. --out {ns.out / 'model.pt'}.")
    try:
        check_own(ns.out, "HINT: pass --out a new file path, e.g. --out model.pt.")  # before the work: a device or a link is refused
        ns.checkpoint = resolve(ns.checkpoint)
        state = model_state(ns.checkpoint, ns.key)
        save_torch(ns.out, state)
    except DistribError as exc:
        return error_exit(exc)
    print(f"wrote {ns.out}: {len(state)} tensors of {ns.key!r} from {ns.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
