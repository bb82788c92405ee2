"""Moving batches to the device: any nesting, non_blocking from pinned memory, optional prefetch."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree

from distrib.errors import BatchError

# Leaves that may ride along in a batch (ids, file names) and are left as they are.
_PASSTHROUGH = (int, float, bool, str, bytes, type(None))


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor], path: str = "batch") -> Any:
    """Apply `fn` to every tensor in a nested batch (tensor, tuple, list, dict, namedtuple, dataclass).

    The per-batch path: no leaf's place is spelled out unless a leaf is not walkable, and then the
    batch is walked again, with places, for the error.
    """
    try:
        return _walk(batch, lambda _, t: fn(t), path, located=False)
    except _Unwalkable:
        return _walk(batch, lambda _, t: t, path, located=True)  # raises the BatchError naming the place


def map_tensors_with_path(batch: Any, fn: Callable[[str, torch.Tensor], torch.Tensor], path: str = "batch") -> Any:
    """`map_tensors`, with each tensor's place in the batch (`batch['x'][0]`) passed to `fn`."""
    return _walk(batch, lambda where, t: fn(where(), t), path, located=True)


class _Unwalkable(Exception):
    """A leaf that is neither a tensor, a plain value nor a container (the located walk names it)."""


def _walk(batch: Any, fn: Callable[[Callable[[], str], torch.Tensor], torch.Tensor], path: str, *, located: bool) -> Any:
    """torch's pytree walks the containers it knows (and those libraries register, like Hugging Face's
    `ModelOutput`); the leaves it leaves are tensors, plain values passed through, and the two
    containers it does not know, walked here: dataclasses and dict subclasses. `located` builds each
    leaf's place (`batch['x'][0]`), which only messages need."""

    def leaf(where: Callable[[], str], value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return fn(where, value)
        if isinstance(value, _PASSTHROUGH):
            return value
        if isinstance(value, dict):  # a dict subclass pytree does not know
            return type(value)((k, _walk(v, fn, f"{where()}[{k!r}]", located=located)) for k, v in value.items())
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes = {f.name: _walk(getattr(value, f.name), fn, f"{where()}.{f.name}", located=located) for f in dataclasses.fields(value) if f.init}
            return dataclasses.replace(value, **changes)
        if not located:
            raise _Unwalkable
        raise BatchError(
            f"{where()} is a {type(value).__module__}.{type(value).__qualname__}, not a tensor or a "
            "tuple/list/dict/namedtuple/dataclass of tensors. HINT: return tensors from the Dataset "
            "(torch.as_tensor(x)) or convert in a collate_fn."
        )

    if located:
        return pytree.tree_map_with_path(lambda key_path, value: leaf(lambda: path + pytree.keystr(key_path), value), batch)
    return pytree.tree_map(lambda value: leaf(lambda: path, value), batch)


def to_device(batch: Any, device: torch.device, *, non_blocking: bool = True) -> Any:
    """Copy every tensor of `batch` to `device`. From pinned memory the copy is asynchronous."""
    found = False

    def move(t: torch.Tensor) -> torch.Tensor:
        nonlocal found
        found = True
        return t.to(device, non_blocking=non_blocking)

    out = map_tensors(batch, move)
    if not found:
        raise BatchError(f"The batch holds no tensor (got {type(batch).__name__}). HINT: the Dataset must return tensors.")
    return out


def leading_dim(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of its first tensor (host metadata, no sync)."""
    sizes: list[int] = []

    def grab(t: torch.Tensor) -> torch.Tensor:
        if not sizes and t.dim() > 0:
            sizes.append(t.shape[0])
        return t

    map_tensors(batch, grab)
    if not sizes:
        raise BatchError(f"Cannot tell the batch size: no tensor with a batch dimension in a {type(batch).__name__}.")
    return sizes[0]


def _recorded(t: torch.Tensor, *, stream: torch.cuda.Stream) -> torch.Tensor:
    """`t`, marked as used on `stream`: its memory is not reused before that stream's work on it is done."""
    t.record_stream(stream)
    return t


class CudaPrefetcher:
    """Copy batch n+1 to the GPU on a side stream while batch n computes.

    The compute stream waits for the copy stream before using a batch, and `record_stream` tells
    the caching allocator that the batch's memory is in use on the compute stream, so it is not
    reused by the next copy while kernels still read it.
    """

    def __init__(self, loader: Iterable[Any], device: torch.device) -> None:
        self.loader, self.device = loader, device
        self.stream = torch.cuda.Stream(device=device)

    def _load(self, it: Iterator[Any]) -> Any:
        try:
            cpu = next(it)
        except StopIteration:
            return _END
        with torch.cuda.stream(self.stream):
            return to_device(cpu, self.device, non_blocking=True)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        nxt = self._load(it)
        while nxt is not _END:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            batch = nxt
            map_tensors(batch, functools.partial(_recorded, stream=compute))
            nxt = self._load(it)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


_END = object()


def device_batches(loader: Iterable[Any], device: torch.device, *, prefetch: bool) -> Iterable[Any]:
    """Batches on `device`: via the side-stream prefetcher on CUDA when asked, else copied inline."""
    if device.type == "cuda" and prefetch:
        return CudaPrefetcher(loader, device)
    return (to_device(b, device, non_blocking=device.type == "cuda") for b in loader)


def describe(batch: Any) -> str:
    """One line per tensor: where it sits in the batch, dtype and shape (printed by --debug and the pre-flight probe)."""
    lines: list[str] = []

    def line(where: str, t: torch.Tensor) -> torch.Tensor:
        lines.append(f"{where}: {str(t.dtype).removeprefix('torch.')}{list(t.shape)} on {t.device}")
        return t

    try:
        map_tensors_with_path(batch, line)
    except BatchError as exc:  # describing a batch that cannot be walked: what was listed, and where it stopped
        lines.append(str(exc).split(". HINT")[0])
    return "\n".join(lines)
