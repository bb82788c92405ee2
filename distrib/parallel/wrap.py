"""Model wrapping (DDP or FSDP2, SyncBatchNorm, torch.compile), unwrapping, and gradient-sync control."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distrib.config import DistConfig
from distrib.errors import ConfigError
from distrib.parallel import activations, fsdp
from distrib.parallel.materialize import InitFn, is_meta, materialize
from distrib.runtime.console import log
from distrib.runtime.group import Runtime
from distrib.runtime.ledger import LEDGER


def wrap_model(
    model: nn.Module,
    rt: Runtime,
    cfg: DistConfig,
    *,
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
    seed: int = 0,
    init_fn: InitFn | None = None,
    activation_checkpointing: str = "none",
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> nn.Module:
    """Move `model` to the rank's device and, with more than one process, wrap it in DDP or shard it (FSDP2).

    In a single process there is no wrapper: the debug run executes the plain module.
    `param_dtype`: FSDP's mixed-precision compute dtype (bf16), None for fp32. A model built on the
    meta device is allocated and initialised here (`materialize.py`: `seed`, `init_fn`).
    """
    if cfg.sync_batchnorm and rt.device.type != "cuda":
        raise ConfigError(
            f"dist.sync_batchnorm=true but this run is on {rt.device}; PyTorch's SyncBatchNorm works only "
            "on CUDA devices. HINT: pass --dist.sync_batchnorm false for CPU runs."
        )
    if cfg.sync_batchnorm and rt.env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    meta = is_meta(model)
    names = {id(p): n for n, p in model.named_parameters()}
    if not meta:
        # module.to() moves parameters in place, so an optimizer built on model.parameters() before
        # wrapping still points at the right tensors.
        model = model.to(rt.device)
    blocks: list[nn.Module] = []
    checkpointing = activation_checkpointing != "none"
    if cfg.strategy == "fsdp" and cfg.fsdp_blocks or meta or checkpointing:
        # A name that matches nothing fails in one process too. A meta model is initialised block by
        # block whatever the strategy, so DDP and FSDP runs start from the same values.
        blocks = fsdp.find_blocks(model, cfg.fsdp_blocks)
    activations.apply(blocks, activation_checkpointing)
    unused = _other_strategys_keys(cfg, checkpointing)
    if unused and rt.env.distributed:
        log.warning(f"dist.strategy={cfg.strategy}: {', '.join(unused)} apply to the other strategy and have no effect here")
    sharding = rt.env.distributed and cfg.strategy == "fsdp"
    if sharding:  # a meta model is sharded first: each rank then allocates only its shards
        model = fsdp.shard(
            model,
            device=rt.device,
            world_size=rt.world_size,
            blocks=cfg.fsdp_blocks,
            reshard_after_forward=cfg.reshard_after_forward,
            param_dtype=param_dtype,
            replicate=cfg.replicate,
            offload=cfg.fsdp_offload,
        )
    if meta:
        materialize(model, rt.device, seed=seed, blocks=blocks, init_fn=init_fn)
    if sharding or meta:
        fsdp.rebind(optimizers, names, dict(model.named_parameters()))
    if rt.env.distributed and not sharding:
        bucket: dict[str, Any] = {} if cfg.bucket_cap_mb is None else {"bucket_cap_mb": cfg.bucket_cap_mb}
        model = DDP(
            model,
            device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
            static_graph=cfg.static_graph,
            gradient_as_bucket_view=cfg.gradient_as_bucket_view,
            # Only when set: any explicit value, even DDP's own 25, also sizes the first bucket
            # (default 1 MiB), which delays the first all-reduce and its overlap with backward.
            **bucket,
        )
    if compile:
        LEDGER.track_compiles()  # a first step's long compile is progress, not a hang
        model = cast(nn.Module, torch.compile(model))  # an OptimizedModule
    return model


def _other_strategys_keys(cfg: DistConfig, checkpointing: bool) -> list[str]:
    defaults = DistConfig()
    ddp_only = ("find_unused_parameters", "static_graph", "gradient_as_bucket_view", "bucket_cap_mb")
    fsdp_only = ("reshard_after_forward",) if checkpointing else ("fsdp_blocks", "reshard_after_forward")  # the blocks checkpointed
    other = ddp_only if cfg.strategy == "fsdp" else fsdp_only
    return [f"dist.{k}" for k in other if getattr(cfg, k) != getattr(defaults, k)]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under torch.compile and DDP wrappers (state_dict keys without `module.`).

    An FSDP2 module is its own: FSDP shards in place, so its parameters stay DTensor shards.
    """
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]
        elif isinstance(model, DDP):
            model = model.module
        else:
            return model


def ddp_of(model: nn.Module) -> DDP | None:
    """The DDP wrapper inside `model`, if any (it may sit under torch.compile)."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, DDP) else None


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Turn DDP's gradient all-reduce on or off for the next backward.

    The one place gradient sync is controlled. Like nanoGPT we flip `require_backward_grad_sync`
    instead of entering `no_sync()`: it works the same under torch.compile and needs no context
    manager around forward *and* backward. With accumulation, all micro-batches but the last skip
    the all-reduce, so each optimizer step does exactly one.
    """
    ddp = ddp_of(model)
    if ddp is not None:
        ddp.require_backward_grad_sync = enabled
    elif fsdp.is_sharded(model):
        fsdp.set_grad_sync(model, enabled)


def params_sha256(model: nn.Module) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes: equal iff bitwise equal.

    Sharded (FSDP) parameters are gathered whole, so every rank must call it.
    """
    h = hashlib.sha256()
    for name, p in sorted(unwrap_model(model).named_parameters()):
        t = fsdp.full_tensor(p.detach()).cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds (FSDP: its shards only).

    Call it after a backward and before `zero_grad` to count the gradients.
    """
    params = list(unwrap_model(model).parameters())
    state = [v for s in (optimizer.state.values() if optimizer is not None else ()) for v in s.values() if isinstance(v, torch.Tensor)]
    out = {"params": fsdp.local_bytes(params), "grads": fsdp.local_bytes(p.grad for p in params), "optimizer": fsdp.local_bytes(state)}
    return {**out, "total": sum(out.values())}


def release_reducers(models: list[nn.Module]) -> None:
    """Drop each DDP wrapper's reducer before the process group goes.

    A reducer that outlives the process group becomes the group's last owner, and its destructor
    joins gloo's threads while holding the GIL, which can deadlock.
    """
    for model in models:
        ddp = model if hasattr(model, "reducer") else getattr(model, "_orig_mod", None)
        if ddp is not None and hasattr(ddp, "reducer"):
            del ddp.reducer
