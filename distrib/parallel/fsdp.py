"""FSDP2 (`dist.strategy=fsdp`): parameters, gradients and optimizer state sharded across ranks.

`shard` applies `fully_shard` to each block and then to the root, the way torchtitan does: a block's
parameters are gathered just before its forward (and backward) and freed after, so a rank holds
its 1/world_size shard of everything plus one block at a time. The rest of distrib sees a module
whose parameters are DTensors; the few places that must know live here:

- `set_grad_sync`: accumulation turns the reduce-scatter off on all but the last micro-batch;
- `full_state_dict` / `full_tensor`: `model.pt` and `params_sha256` gather the whole model;
- the sharded checkpoint format lives with the checkpoints, in `distrib/checkpoint/sharded.py`.

In one process there is nothing to shard: the module stays plain (as with DDP) and only the
checkpoint format (DCP) is FSDP's, so a run can move between 1 process and many.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from distrib.config import DistConfig
from distrib.errors import ConfigError


def _fsdp_module_class() -> type:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or the module under torch.compile) is an FSDP2 module."""
    return isinstance(getattr(model, "_orig_mod", model), _fsdp_module_class())


def find_blocks(model: nn.Module, names: Sequence[str] = ()) -> list[nn.Module]:
    """The modules to shard one by one: those of classes `names`, else the repeated children of containers.

    Auto: walking from the root, an `nn.ModuleList` or `nn.Sequential` whose children with
    parameters include two or more of one class gives those children (a transformer's layers, an
    MLP's Linear layers); the walk does not descend into a block. No such container: no blocks (the
    root alone is sharded).
    """
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if not found:
            # Its submodules' classes: the blocks found automatically first, then the most repeated.
            auto = {type(b).__name__ for b in find_blocks(model)}
            kinds = [type(m).__name__ for m in model.modules() if m is not model and any(True for _ in m.parameters())]
            classes = sorted(set(kinds), key=lambda k: (k not in auto, -kinds.count(k), k))
            root = f" ({type(model).__name__} is the root, which is always sharded)" if type(model).__name__ in names else ""
            raise ConfigError(
                f"dist.fsdp_blocks={','.join(names)} matches no submodule of this model{root}. HINT: name classes it has "
                f"(the blocks found automatically first: {', '.join(classes[:12])}), or leave dist.fsdp_blocks empty to find blocks automatically."
            )
        # A block inside another named block is sharded with it (nesting buys nothing here).
        inside = {id(sub) for m in found for sub in m.modules() if sub is not m}
        return [m for m in found if id(m) not in inside]
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            held = [c for c in module.children() if any(True for _ in c.parameters())]
            kinds = [type(c) for c in held]
            repeated = [c for c in held if kinds.count(type(c)) >= 2]
            if repeated:
                blocks.extend(repeated)
                for c in module.children():
                    if all(c is not r for r in repeated):
                        visit(c)
                return
        for child in module.children():
            visit(child)

    visit(model)
    return blocks


def sharded_layout(cfg: DistConfig, world_size: int) -> bool:
    """Whether models are FSDP-sharded at `world_size` (dist.strategy=fsdp with more than one process), after
    checking the layout the dist.* keys ask for can be built there (a ConfigError before the run starts)."""
    if cfg.strategy != "fsdp":
        return False
    if cfg.fsdp_offload and world_size == 1:
        raise ConfigError(
            "dist.fsdp_offload=true in one process: offload moves FSDP's shards to host memory, and one process shards "
            "nothing. HINT: launch several ranks (torchrun --nproc_per_node=N), or drop --dist.fsdp_offload."
        )
    mesh_shape(world_size, cfg.replicate)
    return world_size > 1


def mesh_shape(world_size: int, replicate: int = 1) -> tuple[int, ...]:
    """The device mesh FSDP builds: `(world_size,)`, or `(replicate, world_size // replicate)` for HSDP."""
    if world_size % replicate:
        divisors = ", ".join(str(d) for d in range(1, world_size + 1) if world_size % d == 0)
        raise ConfigError(
            f"dist.replicate={replicate} does not divide the world size {world_size}: HSDP needs R x S ranks, "
            f"S ranks sharding each of R replicas. HINT: pass --dist.replicate {divisors} (a divisor of {world_size}; "
            "the number of nodes shards within each node)" + (", and launch several ranks." if world_size == 1 else ".")
        )
    return (world_size,) if replicate == 1 else (replicate, world_size // replicate)


def describe_mesh(world_size: int, replicate: int = 1, local_world_size: int | None = None) -> str:
    """One line on the mesh a launch builds: which ranks shard together and which replicate."""
    shape = mesh_shape(world_size, replicate)
    if len(shape) == 1:
        return f"FSDP over all {world_size} ranks (1-D mesh: every block's gradients reduce-scattered across all of them)"
    r, s = shape
    groups = ", ".join(f"{i * s}-{i * s + s - 1}" for i in range(min(r, 3))) + (", ..." if r > 3 else "")
    where = ""
    if local_world_size:
        where = (
            " (each within one node)"
            if s <= local_world_size and local_world_size % s == 0
            else " (groups span nodes: the per-block reduce-scatter crosses the network)"
        )
    return (
        f"HSDP {r} x {s} (2-D mesh replicate x shard): ranks {groups} each hold one sharded copy{where}; "
        f"gradients reduce-scattered within a group, then all-reduced across the {r} replicas once per step"
    )


def shard(
    model: nn.Module,
    *,
    device: torch.device,
    world_size: int,
    blocks: Sequence[str],
    reshard_after_forward: bool,
    param_dtype: torch.dtype | None,
    replicate: int = 1,
    offload: bool = False,
) -> nn.Module:
    """`fully_shard` each block, then the root, on a mesh of all ranks (in place; returns `model`).

    `param_dtype` (bf16): FSDP2's mixed precision, parameters gathered in bf16 for compute, gradients
    reduced in fp32, the model's output in fp32 (so the loss is computed in fp32). The mesh's device
    type is the run's device: with gloo on a GPU machine (`run.device cpu`) nothing moves to CUDA.
    `replicate` > 1: HSDP, a 2-D mesh (`mesh_shape`) that shards within groups of consecutive ranks
    (a node under torchrun and srun, which number a node's ranks together) and replicates across them.
    `offload`: FSDP2's CPUOffloadPolicy, sharded state in host memory (pinned on CUDA) and the optimizer
    step on the CPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    shape = mesh_shape(world_size, replicate)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard") if len(shape) == 2 else None)
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    # Blocks hand bf16 activations on (the next module computes in bf16 too); only the root's output,
    # what the loss is computed from, comes back in fp32.
    inner = MixedPrecisionPolicy() if param_dtype is None else MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    outer = inner if param_dtype is None else MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)
    units = find_blocks(model, blocks)
    try:
        if param_dtype is not None:
            # Modules with floating-point buffers (BatchNorm's running statistics, kept in fp32) compute in
            # fp32 as units of their own, nested in their block: their inputs are cast up, their outputs
            # back down, so what follows them computes in bf16 as before.
            norms = [
                m
                for m in model.modules()
                if m is not model and any(b.is_floating_point() for b in m.buffers(recurse=False)) and any(True for _ in m.parameters(recurse=False))
            ]
            for m in norms:
                fully_shard(
                    m,
                    mesh=mesh,
                    reshard_after_forward=reshard_after_forward,
                    mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=param_dtype),
                    offload_policy=policy,
                )
            units = [u for u in units if all(u is not m for m in norms)]
        for block in units:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=inner, offload_policy=policy)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=outer, offload_policy=policy)
    except ValueError as exc:  # e.g. a parameter shared by two blocks
        raise ConfigError(
            f"FSDP could not shard this model's blocks: {str(exc).strip().splitlines()[0][:300]}. HINT: name blocks that share no "
            "parameter with --dist.fsdp_blocks (tied weights belong to the root, e.g. embeddings), or use --dist.strategy ddp."
        ) from None
    _broadcast_buffers_like_ddp(model)
    return model


def _broadcast_buffers_like_ddp(model: nn.Module) -> None:
    """Before each training forward, every rank takes rank 0's buffers (BatchNorm's running statistics).

    DDP does this (`broadcast_buffers=True`); FSDP shards parameters only, so without it each rank's
    running statistics drift apart, and an eval or a resume (DCP saves rank 0's) would differ from DDP's.
    """
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    buffers = [b for b in model.buffers() if b.is_floating_point() or b.dtype in (torch.int64, torch.int32)]
    if not buffers:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in buffers:
        by_dtype.setdefault(b.dtype, []).append(b)

    def pre_forward(module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            # One broadcast per dtype, not per buffer (a ResNet has hundreds), as DDP coalesces them.
            for group in by_dtype.values():
                flat = _flatten_dense_tensors(group)
                dist.broadcast(flat, src=0)
                for b, synced in zip(group, _unflatten_dense_tensors(flat, group)):
                    b.copy_(synced)

    model.register_forward_pre_hook(pre_forward)


def reshard(model: nn.Module) -> None:
    """Free parameters an eval left gathered (`reshard_after_forward=false` keeps them until a backward)."""
    for m in getattr(model, "_orig_mod", model).modules():
        if isinstance(m, _fsdp_module_class()):
            m.reshard()  # type: ignore[attr-defined]  # FSDPModule's, mixed into the class


def rebind(optimizers: Iterable[torch.optim.Optimizer], names: Mapping[int, str], sharded: Mapping[str, nn.Parameter]) -> None:
    """Point optimizers built before setup at the parameters setup made (FSDP's shards, a meta-built model's
    allocated ones; `names`: id of the old -> its name)."""
    for opt in optimizers:
        if opt.state:
            raise ConfigError(
                "session.setup() got an optimizer that has already stepped, for a model whose parameters setup replaces "
                "(dist.strategy=fsdp shards them; a meta-built model is allocated); its state would not follow. "
                "HINT: pass the optimizer to setup() before training (or build it after setup)."
            )
        for group in opt.param_groups:
            try:
                group["params"] = [sharded[names[id(p)]] for p in group["params"]]
            except KeyError:
                raise ConfigError(
                    "an optimizer given to session.setup() holds parameters of another model. HINT: build it on model.parameters() of the model you pass."
                ) from None


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Turn FSDP's gradient reduce-scatter on or off for the next backward (every sharded submodule).

    FSDP walks all its modules to set it, and this is called around every micro-batch: only a
    change is passed on.
    """
    root = getattr(model, "_orig_mod", model)
    if getattr(root, "_distrib_grad_sync", None) != enabled:
        root.set_requires_gradient_sync(enabled)  # type: ignore[operator]  # FSDPModule's method
        setattr(root, "_distrib_grad_sync", enabled)  # noqa: B010 (FSDP declares no such attribute)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (a collective: every rank calls it), else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """The plain module's whole `state_dict` on CPU, gathered on every rank's call; rank 0 gets it, others `{}`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes this rank holds for `tensors` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total
