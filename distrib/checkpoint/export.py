"""A checkpoint's model out of distrib (`distrib export`, `distrib/cli/export.py`): as one plain
state_dict (`model_state`), or as safetensors, sharded above a size with Hugging Face's index, one
tensor in memory at a time (`sources`, `write`).

The tensors are listed first (name, shape, dtype) from what describes them without reading them: a
DDP checkpoint's `state.pt` mapped, an FSDP checkpoint's DCP metadata, a `model.pt` mapped. Each
output file's header is written from that list, then each tensor is read (an FSDP tensor assembled
from its shards by DCP, alone), its bytes appended, and dropped: peak memory is the largest tensor,
not the model. safetensors has no streaming writer, so the format (an 8-byte header length, a JSON
header of names, dtypes, shapes and byte offsets, then the bytes) is written here; the files are read
back with the `safetensors` library in the tests, and by `from_pretrained`.

Tensors that share storage in the source (a tied head) are written once per name, as separate bytes:
safetensors has no aliasing, and `from_pretrained` ties them again as the model's config says.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from distrib.checkpoint import sharded
from distrib.checkpoint import store as checkpoint
from distrib.checkpoint.fileio import fsync_dir, open_own
from distrib.checkpoint.rundir import MODEL_FILE
from distrib.errors import ConfigError

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class Source:
    """One tensor of a checkpoint's model: its name, shape and dtype, and how to read it (when its turn comes)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    sharded: bool = False
    """An FSDP checkpoint's tensor: `read` assembles it from every rank's shard (DCP)."""

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def resolve(path: Path) -> Path:
    """`path` if it is a checkpoint; for a run directory (or its `checkpoints/`), the newest good checkpoint in it."""
    if (path / checkpoint.MANIFEST).exists():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = checkpoint.newest_good(root)
    return found[0] if found is not None else path


def _verified(path: Path) -> None:
    try:
        checkpoint.verify(path)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(f"{path} is not a usable checkpoint: {exc}. HINT: pass a directory like RUN_DIR/checkpoints/step-000000100.") from None


def model_state(path: Path, key: str = "model", *, mmap: bool = False) -> dict[str, Any]:
    """The plain state_dict stored under `key` in checkpoint `path` (verified first; `mmap`: DDP's tensors left in the file)."""
    _verified(path)
    shared = checkpoint.load_file(path / "state.pt", mmap=mmap)
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


def sources(path: Path, key: str = "model") -> list[Source]:
    """The model `key` of checkpoint `path` (or a `model.pt`) as tensors not yet read (verified first)."""
    if path.is_file() or (path / MODEL_FILE).is_file() and not (path / checkpoint.MANIFEST).exists():
        state = torch.load(path if path.is_file() else path / MODEL_FILE, map_location="cpu", mmap=True, weights_only=True)
        return [Source(k, tuple(v.shape), v.dtype, functools.partial(_given, v)) for k, v in state.items()]
    _verified(path)
    if (path / sharded.SHARDED_DIR).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        reader_dir = path / sharded.SHARDED_DIR
        meta = dcp.FileSystemReader(reader_dir).read_metadata().state_dict_metadata
        prefix = f"{key}."
        found = [(k[len(prefix) :], m) for k, m in meta.items() if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)]
        if found:
            return [Source(name, tuple(m.size), m.properties.dtype, functools.partial(_one_sharded, reader_dir, key, name, m), True) for name, m in found]
    state = model_state(path, key, mmap=True)
    return [Source(k, tuple(v.shape), v.dtype, functools.partial(_given, v)) for k, v in state.items()]


def _given(t: torch.Tensor) -> torch.Tensor:
    return t


def _one_sharded(reader_dir: Path, key: str, name: str, meta: Any) -> torch.Tensor:
    """One tensor of an FSDP checkpoint, assembled from every rank's shard by DCP, alone in memory."""
    import torch.distributed.checkpoint as dcp

    out = {key: {name: torch.empty(meta.size, dtype=meta.properties.dtype)}}
    with sharded._one_process_is_fine():
        dcp.load(out, storage_reader=dcp.FileSystemReader(reader_dir), no_dist=True, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    return out[key][name]


def write(out: Path, tensors: list[Source], *, max_shard_bytes: int) -> list[Path]:
    """`out/model.safetensors`, or `model-0000k-of-0000n.safetensors` and the index above `max_shard_bytes`; the files written."""
    for t in tensors:
        if t.dtype not in DTYPES:
            raise ConfigError(f"{t.name} is {t.dtype}, which safetensors does not store. HINT: export --format pt instead.")
    shards = list(_split(tensors, max_shard_bytes))
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written = []
    for name, shard in zip(names, shards):
        written.append(_write_file(out / name, shard))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": {t.name: n for n, s in zip(names, shards) for t in s}}
        with open_own(out / INDEX_FILE, append=False) as f:
            _write_all(f, memoryview(json.dumps(index, indent=2).encode()))
        written.append(out / INDEX_FILE)
    fsync_dir(out)
    return written


def _split(tensors: list[Source], limit: int) -> Iterator[list[Source]]:
    shard: list[Source] = []
    size = 0
    for t in tensors:
        if shard and size + t.nbytes > limit:
            yield shard
            shard, size = [], 0
        shard.append(t)
        size += t.nbytes
    if shard or not tensors:
        yield shard


def _write_all(f: Any, data: memoryview) -> None:
    while data:  # an unbuffered file may take fewer bytes than offered
        data = data[f.write(data) :]


def _write_file(path: Path, tensors: list[Source]) -> Path:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open_own(path, append=False) as f:
        _write_all(f, memoryview(struct.pack("<Q", len(text)) + text))
        for t in tensors:
            value = t.read().detach().to("cpu").contiguous()
            if tuple(value.shape) != t.shape or value.dtype != t.dtype:
                raise ConfigError(f"{t.name} read as {tuple(value.shape)} {value.dtype}, described as {t.shape} {t.dtype}: the checkpoint is inconsistent.")
            if value.numel():
                _write_all(f, value.reshape(-1).view(torch.uint8).numpy().data)  # no copy of the bytes
            del value
        os.fsync(f.fileno())
    return path
