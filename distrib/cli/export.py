"""`distrib export CHECKPOINT --out PATH [--format pt|safetensors|hf]`: a checkpoint's model outside distrib.

- `pt` (default): one plain `state_dict` file that `torch.load(path, weights_only=True)` reads.
- `safetensors`: a directory with `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards and
  `model.safetensors.index.json` above `--max-shard-size`, written one tensor in memory at a time.
- `hf`: the same plus the Hugging Face model's `config.json` (the run's `hf_config.json`, or `--config`),
  so `AutoModel*.from_pretrained(DIR)` loads it unchanged.

Works on both checkpoint formats: an FSDP checkpoint's DCP shards (any number of ranks) are read in
this one process; a DDP checkpoint's `state.pt` already holds the whole model. The code is in
`distrib/checkpoint/export.py`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from distrib.checkpoint.export import model_state, resolve, sources, write
from distrib.checkpoint.fileio import check_own, foreign_dir, save_torch, write_atomic
from distrib.checkpoint.rundir import HF_CONFIG_FILE
from distrib.errors import CommandParser, ConfigError, DistribError, error_exit

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.I)


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `2GiB` or a number of bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"--max-shard-size {text!r} is not a size. HINT: pass e.g. 5GB, 500MB or a number of bytes.")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def main(argv: Sequence[str] | None = None) -> int:
    p = CommandParser(
        prog="distrib export", description="Write a checkpoint's model (sharded or not) as a state_dict file, safetensors, or a Hugging Face model directory."
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory (RUN_DIR/checkpoints/step-000000100), or a run directory: its newest good one")
    p.add_argument("--out", type=Path, required=True, help="pt: the .pt file to write; safetensors, hf: a new (or empty) directory")
    p.add_argument(
        "--format", choices=("pt", "safetensors", "hf"), default="pt", help="pt (one state_dict file), safetensors, or hf (safetensors and config.json)"
    )
    p.add_argument("--key", default="model", help="the state key of the model in the checkpoint (fit's is `model`)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors, hf: the largest file before the model is split in shards (default 5GB)")
    p.add_argument("--config", type=Path, help="hf: the model's config.json (or a directory holding one) when the run did not record it")
    ns = p.parse_args(argv)
    try:
        if ns.format == "pt":
            return _export_pt(ns.checkpoint, ns.out, ns.key)
        return _export_safetensors(ns.checkpoint, ns.out, ns.key, parse_size(ns.max_shard_size), hf=ns.format == "hf", config=ns.config)
    except DistribError as exc:
        return error_exit(exc)


def _export_pt(source: Path, out: Path, key: str) -> int:
    if out.is_dir():
        return error_exit(f"--out {str(out)!r} is a directory. HINT: pass a file path, e.g. --out {out / 'model.pt'}, or --format safetensors.")
    check_own(out, "HINT: pass --out a new file path, e.g. --out model.pt.")  # before the work: a device or a link is refused
    source = resolve(source)
    state = model_state(source, key)
    save_torch(out, state)
    print(f"wrote {out}: {len(state)} tensors of {key!r} from {source}")
    return 0


def _export_safetensors(source: Path, out: Path, key: str, max_shard: int, *, hf: bool, config: Path | None) -> int:
    what = foreign_dir(out)
    if what is not None or (out.is_dir() and any(out.iterdir())):
        return error_exit(
            f"--out {str(out)!r} is {what or 'a directory that is not empty'}; distrib writes a model directory only where nothing is. "
            "HINT: pass a new directory."
        )
    checkpoint = resolve(source)
    config_text = _hf_config(checkpoint, config) if hf else None  # before anything is written
    tensors = sources(checkpoint, key)
    out.mkdir(parents=True, exist_ok=True)
    files = write(out, tensors, max_shard_bytes=max_shard)
    if config_text is not None:
        write_atomic(out / "config.json", config_text.encode())
    print(f"wrote {out}: {len(tensors)} tensors of {key!r} from {checkpoint} in {len([f for f in files if f.suffix == '.safetensors'])} file(s)")
    return 0


def _hf_config(checkpoint: Path, given: Path | None) -> str:
    """The Hugging Face config to write: `given` (a config.json or its directory), else the run's recorded one."""
    if given is not None:
        path = given / "config.json" if given.is_dir() else given
        if not path.is_file():
            raise ConfigError(f"--config {str(given)!r} holds no config.json. HINT: pass the pretrained model's directory or its config.json.")
        return path.read_text()
    for run in (checkpoint, *checkpoint.parents[:2]):  # a run directory, or a checkpoint two levels down in one
        if (run / HF_CONFIG_FILE).is_file():
            return json.dumps(json.loads((run / HF_CONFIG_FILE).read_text()), indent=2)
    raise ConfigError(
        f"--format hf needs the model's config.json, and the run of {checkpoint} did not record one (distrib records it for a Hugging "
        "Face model given to setup). HINT: pass --config with the pretrained model's directory, or use --format safetensors."
    )


if __name__ == "__main__":
    sys.exit(main())
