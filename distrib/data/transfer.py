"""Moving batches to the device: any nesting, non_blocking from pinned memory, optional prefetch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from distrib.errors import BatchError

# Leaves that may ride along in a batch (ids, file names) and are left as they are.
_PASSTHROUGH = (int, float, bool, str, bytes, type(None))


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor], path: str = "batch") -> Any:
    """Apply `fn` to every tensor in a nested batch (tensor, tuple, list, dict, namedtuple, dataclass)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, _PASSTHROUGH):
        return batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(v, fn, f"{path}.{k}") for k, v in zip(batch._fields, batch)))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn, f"{path}[{i}]") for i, v in enumerate(batch))
    if isinstance(batch, dict):
        return type(batch)((k, map_tensors(v, fn, f"{path}[{k!r}]")) for k, v in batch.items())
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: map_tensors(getattr(batch, f.name), fn, f"{path}.{f.name}") for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    raise BatchError(
        f"{path} is a {type(batch).__module__}.{type(batch).__qualname__}, not a tensor or a "
        "tuple/list/dict/namedtuple/dataclass of tensors. HINT: return tensors from the Dataset "
        "(torch.as_tensor(x)) or convert in a collate_fn."
    )


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
            map_tensors(batch, lambda t: (t.record_stream(compute), t)[1])  # noqa: B023 (called at once)
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
    """One line per tensor: where it sits in the batch, dtype and shape (printed by --debug)."""
    lines: list[str] = []

    def visit(obj: Any, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            lines.append(f"{path}: {str(obj.dtype).removeprefix('torch.')}{list(obj.shape)} on {obj.device}")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, f"{path}[{k!r}]")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(v, f"{path}[{i}]")
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                visit(getattr(obj, f.name), f"{path}.{f.name}")

    visit(batch, "batch")
    return "\n".join(lines)
