"""Pretrained weights into a model distrib has set up: each rank reads only the bytes of its own shards.

`load_weights(model, path)` takes the model `session.setup` returned (FSDP-sharded or not) and a
source: a Hugging Face model directory (`model.safetensors`, or sharded `model-0000k-of-0000n.safetensors`
with its index JSON), a single `.safetensors` file, a `model.pt` (a whole state_dict), a distrib run
directory (its `model.pt`, else its newest checkpoint) or a distrib checkpoint (its `model`; an FSDP
checkpoint's shards are read by DCP, each rank its part). safetensors files are read through `safe_open(...).get_slice`, which
maps the file and copies out only the rows asked for: under FSDP a rank reads its shard of each
tensor and never holds the whole model. A `model.pt` is opened with `mmap=True` to the same effect.

Everything is compared before anything is copied: names missing from the source, names the model
does not have, shapes and dtypes that differ are one error listing them (exit 2). `strict=False`
loads what matches, keeps the rest at its initialisation and says which.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distrib.checkpoint import export, sharded
from distrib.checkpoint import store as checkpoint
from distrib.checkpoint.rundir import MODEL_FILE
from distrib.errors import ConfigError
from distrib.parallel.wrap import unwrap_model
from distrib.runtime.console import log

_SAFETENSORS_DTYPES = {name: dtype for dtype, name in export.DTYPES.items()}  # the writer's table, read the other way


@dataclasses.dataclass(frozen=True, kw_only=True)
class Loaded:
    """What `load_weights` did: the tensors loaded, those left at init (`strict=False`), and the bytes this rank read."""

    loaded: list[str]
    kept: list[str]
    ignored: list[str]
    bytes_read: int
    source: str


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> Loaded:
    """Copy the weights at `path` into `model` (see the module doc); every rank calls it."""
    source = _checkpoint_of(Path(path))
    with ExitStack() as stack:
        module = unwrap_model(model)
        tensors = _open(source, stack, module)  # name -> (shape, dtype, read(slices) -> tensor), nothing read yet
        targets = _targets(module)
        pairs, problems, missing, unexpected = _compare(targets, tensors)
        if problems or (strict and (missing or unexpected)):
            parts = (
                problems
                + ([f"missing from the source: {_few(missing)}"] if missing else [])
                + ([f"not in the model: {_few(unexpected)}"] if unexpected else [])
            )
            hint = "fix the source or the model" + (
                "; for an intended partial load (a new head), pass --ckpt.init_strict false (session.load_weights(..., strict=False))" if not problems else ""
            )
            raise ConfigError(f"The weights at {source} do not fit the model: {'; '.join(parts)}. Nothing was loaded. HINT: {hint}.")
        read = 0
        with torch.no_grad():
            for name, src in pairs.items():
                read += _copy_into(targets[name][0], tensors[src][2])
        if (source / sharded.SHARDED_DIR).is_dir():  # an FSDP checkpoint: DCP reads each rank's part of the shards
            sharded.load_sharded(source / sharded.SHARDED_DIR, {"model": module}, [module])
            read = sum(_local_bytes(targets[name][0]) for name in pairs)
    if missing:
        log.info(f"loaded {source}; kept at their initialisation (not in the source): {_few(missing)}")
    if unexpected:
        log.info(f"loaded {source}; ignored (not in the model): {_few(unexpected)}")
    return Loaded(loaded=list(pairs), kept=missing, ignored=unexpected, bytes_read=read, source=str(source))


def _few(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _targets(module: nn.Module) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """The model's state_dict tensors under their first name, each with all its names (a tied head has two)."""
    first: dict[int, str] = {}
    out: dict[str, tuple[torch.Tensor, list[str]]] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        key = first.setdefault(id(t), name)
        if key == name:
            out[name] = (t, [name])
        else:
            out[key][1].append(name)
    return out


def _compare(targets: dict[str, tuple[torch.Tensor, list[str]]], tensors: dict[str, Any]) -> tuple[dict[str, str], list[str], list[str], list[str]]:
    """(model name -> the source name it loads from, problems, missing, unexpected)."""
    found = {name: next((n for n in names if n in tensors), None) for name, (_, names) in targets.items()}
    pairs = {name: src for name, src in found.items() if src is not None}
    problems = []
    for name, src in pairs.items():
        t, (shape, dtype, _) = targets[name][0], tensors[src]
        if tuple(shape) != tuple(t.shape):
            problems.append(f"{src} has shape {tuple(shape)} in the source and {tuple(t.shape)} in the model")
        elif dtype != t.dtype:
            problems.append(f"{src} is {str(dtype).removeprefix('torch.')} in the source and {str(t.dtype).removeprefix('torch.')} in the model")
    known = {n for _, names in targets.values() for n in names}
    return pairs, problems, [n for n, src in found.items() if src is None], [n for n in tensors if n not in known]


def _checkpoint_of(path: Path) -> Path:
    """A run directory without a model.pt stands for its newest good checkpoint."""
    if path.is_dir() and not (path / MODEL_FILE).exists() and (path / "checkpoints").is_dir():
        return export.resolve(path)
    return path


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _open(source: Path, stack: ExitStack, module: nn.Module) -> dict[str, tuple[torch.Size, torch.dtype, Any]]:
    """The source's tensors by name: (shape, dtype, read(slices)), nothing read yet."""
    if (source / checkpoint.MANIFEST).is_file():
        return _checkpoint_tensors(source)
    if source.is_dir():
        if (source / export.INDEX_FILE).is_file():
            index = json.loads((source / export.INDEX_FILE).read_text())
            files = sorted({source / f for f in index.get("weight_map", {}).values()})
        elif (source / "model.safetensors").is_file():
            files = [source / "model.safetensors"]
        elif (source / MODEL_FILE).is_file():
            return _open(source / MODEL_FILE, stack, module)
        else:
            files = sorted(source.glob("*.safetensors"))
        if not files:
            raise ConfigError(
                f"{source} holds no weights distrib can read: no {export.INDEX_FILE}, model.safetensors, *.safetensors or {MODEL_FILE}. "
                "HINT: pass a Hugging Face model directory (save_pretrained), a .safetensors file, a model.pt, or a distrib run directory."
            )
        return {k: v for f in files for k, v in _safetensors(f, stack).items()}
    if not source.exists():
        raise ConfigError(f"{source} does not exist. HINT: pass a Hugging Face model directory, a .safetensors file, a model.pt or a distrib run directory.")
    if source.suffix == ".safetensors":
        return _safetensors(source, stack)
    state = torch.load(source, map_location="cpu", mmap=True, weights_only=True)  # mapped: only the rows read are paged in
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{source} is not a state_dict of tensors (a model.pt). HINT: pass a file written by torch.save(model.state_dict()).")
    return {k: (v.shape, v.dtype, lambda slices, v=v: v[slices]) for k, v in state.items()}


def _checkpoint_tensors(path: Path) -> dict[str, tuple[torch.Size, torch.dtype, Any]]:
    """A distrib checkpoint's model (under the key `model`, as fit saves it): DDP's from state.pt, mapped;
    FSDP's described by its DCP metadata (`load_weights` then has DCP read each rank's part)."""
    return {s.name: (torch.Size(s.shape), s.dtype, _dcp_reads if s.sharded else functools.partial(_rows, s.read)) for s in export.sources(path)}


def _rows(read: Any, slices: Any) -> torch.Tensor:
    return read()[slices]


def _dcp_reads(slices: Any) -> None:
    """The reader of an FSDP checkpoint's tensors: none here, DCP reads them (`load_weights`)."""


def _safetensors(path: Path, stack: ExitStack) -> dict[str, tuple[torch.Size, torch.dtype, Any]]:
    from safetensors import safe_open

    f = stack.enter_context(safe_open(str(path), framework="pt"))
    out = {}
    for name in f.keys():
        s = f.get_slice(name)
        dtype = _SAFETENSORS_DTYPES.get(s.get_dtype())
        if dtype is None:
            raise ConfigError(f"{path}: {name} has dtype {s.get_dtype()}, which distrib does not load. HINT: convert it to a torch dtype first.")
        out[name] = (torch.Size(s.get_shape()), dtype, lambda slices, s=s: s[slices] if slices else s[:])
    return out


def _copy_into(t: torch.Tensor, read: Any) -> int:
    """Copy this rank's part of a source tensor into `t` (a DTensor shard: its rows only); the bytes read."""
    from torch.distributed.tensor import DTensor

    if read is _dcp_reads:  # an FSDP checkpoint's tensor: DCP loads it after the comparison
        return 0
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        local = t.to_local()
        if local.numel() == 0:
            return 0
        part = read(tuple(slice(o, o + n) for o, n in zip(offset, shape)))
        local.copy_(part)
        return part.numel() * part.element_size()
    whole = read(tuple(slice(0, n) for n in t.shape))
    t.copy_(whole)
    return whole.numel() * whole.element_size()
