"""Models built on the meta device: allocated on the rank's device (under FSDP, only the rank's
shards) and initialised to the same values however the run is sharded.

    with torch.device("meta"):
        model = MyTransformer(cfg)          # no memory, no init
    model = session.setup(model)           # allocated and initialised here

A model built on the meta device has shapes and no values. `materialize` allocates it (`to_empty`:
under FSDP each rank gets only its shards) and runs the modules' own initialisation: the user's
`init_fn(module)` if given, else a Hugging Face model's `_init_weights(module)`, else each module's
`reset_parameters()`, module by module in `nn.Module.apply`'s order (children first).

The values do not depend on the sharding. Each unit (an FSDP block, or one module outside the
blocks) is built whole in host memory, one at a time, and each module's init draws from the CPU
generator seeded by (seed, the module's name); then each rank keeps its slice. So 1, 2 or 4 ranks,
DDP or FSDP, give bitwise the same parameters, and peak memory is the largest block, as FSDP's own
all-gather needs anyway. The values differ from the same model built directly on a device (there
the modules draw one after another from the global generator).

A tensor no init wrote (a float left NaN, an integer left at its sentinel) is an error naming it:
a buffer computed in `__init__` (rotary frequencies, a causal mask) is lost on the meta device.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from distrib.errors import ConfigError

InitFn = Callable[[nn.Module], Any]


def is_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of `model` is on the meta device (it was built without values)."""
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def materialize(model: nn.Module, device: torch.device, *, seed: int, blocks: Sequence[nn.Module] = (), init_fn: InitFn | None = None) -> None:
    """Allocate a meta-built `model` on `device` (FSDP: its shards) and initialise it (see the module doc).

    `blocks`: the units built whole one at a time (FSDP's blocks); every other module is its own unit.
    """
    ties = _ties(model)
    model.to_empty(device=device)
    for (owner, key), *others in ties:  # to_empty gives each module its own copy of a shared parameter: share it again
        for module, other in others:
            module._parameters[other] = owner._parameters[key]
    init = _initializer(model, init_fn)
    missing: list[str] = []
    for prefix, unit, whole in _units(model, {id(b) for b in blocks}):
        missing += _init_unit(unit, prefix, whole, init, seed)
    if missing:
        raise ConfigError(
            f"The model was built on the meta device, and no initialisation set {len(missing)} of its tensors: {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}. A buffer computed in __init__ is lost on the meta device. HINT: give those modules a "
            "reset_parameters() that sets them, or pass init_fn= to session.setup(), or build the model on a real device."
        )


def _ties(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Parameters held by several modules (tied embeddings): each as [(module, name), ...], first holder first."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, key))
    return [h for h in holders.values() if len(h) > 1]


def _initializer(model: nn.Module, init_fn: InitFn | None) -> InitFn:
    own = init_fn or getattr(model, "_init_weights", None)  # a Hugging Face PreTrainedModel's per-module init

    def init(module: nn.Module) -> None:
        if own is not None:
            own(module)
        # What the chosen init left unset, the module's own reset fills (a Hugging Face init knows only its model's types).
        reset = getattr(module, "reset_parameters", None)
        if callable(reset) and (own is None or any(_unset(t) for t in _direct(module).values())):
            reset()

    return init


def _units(model: nn.Module, blocks: set[int], prefix: str = "") -> Iterator[tuple[str, nn.Module, bool]]:
    """(name prefix, module, whole) in `apply`'s order: a block whole, every other module alone after its children."""
    if id(model) in blocks:
        yield prefix, model, True
        return
    for name, child in model.named_children():
        yield from _units(child, blocks, f"{prefix}{name}.")
    yield prefix, model, False


def _post_order(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix, module


def _direct(module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{k}": t for k, t in itertools.chain(module._parameters.items(), module._buffers.items()) if t is not None}


def _sentinel(t: torch.Tensor) -> torch.Tensor:
    """A value no init writes: NaN for floats, the most negative integer for integers."""
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return t.fill_(float("nan"))
    if t.dtype != torch.bool:
        return t.fill_(torch.iinfo(t.dtype).min)
    return t.fill_(False)


def _unset(t: torch.Tensor) -> bool:
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return bool(torch.isnan(t).any())
    if t.dtype != torch.bool:
        return bool((t == torch.iinfo(t.dtype).min).all()) and t.numel() > 0
    return False


def _key(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _init_unit(unit: nn.Module, prefix: str, whole: bool, init: InitFn, seed: int) -> list[str]:
    """Initialise one unit whole in host memory, then copy each rank's part into its tensors; the unset tensors' names."""
    modules = list(_post_order(unit, prefix)) if whole else [(prefix, unit)]
    real: list[tuple[nn.Module, str, torch.Tensor, str]] = []
    for name, module in modules:
        for key, t in _direct(module).items():
            real.append((module, key, t, f"{name}{key}"))
    if not real:
        return []
    # Stand-ins of the whole shape on the host, filled with a value no init writes.
    for module, key, t, _ in real:
        stand_in = _sentinel(torch.empty(t.shape, dtype=t.dtype, device="cpu"))
        if key in module._parameters:
            module._parameters[key] = nn.Parameter(stand_in, requires_grad=t.requires_grad)
        else:
            module._buffers[key] = stand_in
    try:
        with torch.no_grad():
            for name, module in modules:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_key(seed, name.rstrip(".")))
                    init(module)
        values = [(module._parameters[key] if key in module._parameters else module._buffers[key]) for module, key, _, _ in real]
    finally:
        for module, key, t, _ in real:
            if key in module._parameters:
                module._parameters[key] = t  # type: ignore[assignment]
            else:
                module._buffers[key] = t
    unset = []
    with torch.no_grad():
        for (_, _, t, full_name), value in zip(real, values):
            assert value is not None
            if _unset(value):
                unset.append(full_name)
            _copy_part(t, value)
    return unset


def _copy_part(t: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this rank's part of `whole` into `t` (a DTensor shard under FSDP, else the whole tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(t, DTensor):
        # src_data_rank=None: every rank holds `whole` already, so each slices its own part, no communication.
        part = distribute_tensor(whole.to(t.device), t.device_mesh, t.placements, src_data_rank=None).to_local()
        t.to_local().copy_(part)
    else:
        t.copy_(whole)
