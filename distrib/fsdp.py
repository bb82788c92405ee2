"""FSDP2 (`dist.strategy=fsdp`): parameters, gradients and optimizer state sharded across ranks.

`shard` applies `fully_shard` to each block and then to the root, the way torchtitan does: a block's
parameters are gathered just before its forward (and backward) and freed after, so a rank holds
its 1/world_size shard of everything plus one block at a time. The rest of distrib sees a module
whose parameters are DTensors; the few places that must know live here:

- `set_grad_sync`: accumulation turns the reduce-scatter off on all but the last micro-batch;
- `full_state_dict` / `full_tensor`: `model.pt` and `params_sha256` gather the whole model;
- `sharded_state` / `load_sharded`: checkpoints through `torch.distributed.checkpoint` (DCP), each
  rank writing its own shard, at any world size on resume (DCP reshards);
- `convert`: a sharded checkpoint into a plain `state_dict` file, no distrib needed to load it.

In one process there is nothing to shard: the module stays plain (as with DDP) and only the
checkpoint format (DCP) is FSDP's, so a run can move between 1 process and many.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from distrib.errors import ConfigError

SHARDED_DIR = "sharded"
"""A checkpoint's DCP directory: `.metadata` and one `__<rank>_0.distcp` file per rank."""


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
            classes = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))})
            raise ConfigError(
                f"dist.fsdp_blocks={','.join(names)} matches no module of this model. HINT: name classes it has "
                f"(those holding parameters: {', '.join(classes[:12])}), or leave dist.fsdp_blocks empty to find blocks automatically."
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


def shard(model: nn.Module, *, device: torch.device, world_size: int, blocks: Sequence[str], reshard_after_forward: bool,
          param_dtype: torch.dtype | None) -> nn.Module:
    """`fully_shard` each block, then the root, on a 1-D mesh of all ranks (in place; returns `model`).

    `param_dtype` (bf16): FSDP2's mixed precision, parameters gathered in bf16 for compute, gradients
    reduced in fp32, the model's output in fp32 (so the loss is computed in fp32). The mesh's device
    type is the run's device: with gloo on a GPU machine (`run.device cpu`) nothing moves to CUDA.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy() if param_dtype is None else MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)
    for block in find_blocks(model, blocks):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return model


def rebind(optimizers: Iterable[torch.optim.Optimizer], names: Mapping[int, str], sharded: Mapping[str, nn.Parameter]) -> None:
    """Point optimizers built before `shard` at the sharded parameters (`names`: id of the old -> its name)."""
    for opt in optimizers:
        if opt.state:
            raise ConfigError("with dist.strategy=fsdp, session.setup() got an optimizer that has already stepped; its state "
                              "is not sharded. HINT: pass the optimizer to setup() before training (or build it after setup).")
        for group in opt.param_groups:
            try:
                group["params"] = [sharded[names[id(p)]] for p in group["params"]]
            except KeyError:
                raise ConfigError("with dist.strategy=fsdp, an optimizer given to session.setup() holds parameters of "
                                  "another model. HINT: build it on model.parameters() of the model you pass.") from None


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Turn FSDP's gradient reduce-scatter on or off for the next backward (every sharded submodule)."""
    getattr(model, "_orig_mod", model).set_requires_gradient_sync(enabled)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (a collective: every rank calls it), else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """The plain module's whole `state_dict` on CPU, gathered on every rank's call; rank 0 gets it, others `{}`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --------------------------------------------------------------------------- checkpoints (DCP)


def _owner(optimizer: torch.optim.Optimizer, models: Iterable[nn.Module]) -> nn.Module:
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for model in models:
        if any(id(p) in params for p in model.parameters()):
            return model
    raise ConfigError(
        "with dist.strategy=fsdp an optimizer is checkpointed with its model, but this optimizer's parameters belong to "
        "no model given to session.setup(). HINT: build the optimizer on model.parameters() and pass the model to setup()."
    )


def is_sharded_state(value: Any) -> bool:
    """The state a checkpoint stores through DCP under FSDP: modules and optimizers (the rest goes to state.pt)."""
    return isinstance(value, (nn.Module, torch.optim.Optimizer))


def sharded_state(state: Mapping[str, Any], models: Sequence[nn.Module]) -> dict[str, Any]:
    """`{key: state_dict}` for the modules and optimizers in `state`, as DTensor shards (FQN-keyed optimizer state)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, nn.Module):
            out[key] = get_model_state_dict(value)
        elif isinstance(value, torch.optim.Optimizer):
            out[key] = get_optimizer_state_dict(_owner(value, models), value)
    return out


def layout(value: Any) -> dict[str, Any]:
    """What a resume compares before loading (`distrib.resume.incompatibilities`): shapes and groups, no data."""
    if isinstance(value, nn.Module):
        return {"shapes": {k: list(v.shape) for k, v in value.state_dict().items() if hasattr(v, "shape")}}
    return {"param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(g["params"])))}
                             for g in value.param_groups]}


class _Shape:
    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = torch.Size(shape)


def saved_stub(saved_layout: Mapping[str, Any]) -> Any:
    """A stand-in for a saved state_dict that `incompatibilities` can compare (names, shapes, groups)."""
    if "shapes" in saved_layout:
        return {k: _Shape(v) for k, v in saved_layout["shapes"].items()}
    return {"param_groups": saved_layout["param_groups"], "state": {}}


def save_sharded(path: Path, state: Mapping[str, Any], group: Any = None) -> None:
    """Every rank writes its shard of `state` into `path` (DCP; rank 0 also `.metadata`), fsynced."""
    import torch.distributed.checkpoint as dcp

    path.mkdir(parents=True, exist_ok=True)
    dcp.save(dict(state), storage_writer=dcp.FileSystemWriter(path, sync_files=True), process_group=group)


def load_sharded(path: Path, state: Mapping[str, Any], models: Sequence[nn.Module]) -> None:
    """Load `path`'s shards into the modules and optimizers of `state` (resharded to this world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    current = sharded_state(state, models)
    dcp.load(current, storage_reader=dcp.FileSystemReader(path))
    for key, value in state.items():
        if isinstance(value, nn.Module):
            set_model_state_dict(value, current[key])
        elif isinstance(value, torch.optim.Optimizer):
            set_optimizer_state_dict(_owner(value, models), value, current[key])


def convert(checkpoint: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """The plain `state_dict` of `key` (a module) from a sharded checkpoint, in one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(checkpoint / SHARDED_DIR)
    meta = reader.read_metadata().state_dict_metadata
    prefix = f"{key}."
    tensors = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
               if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not tensors:
        keys = sorted({k.split(".", 1)[0] for k in meta})
        raise ConfigError(f"{checkpoint} holds no sharded {key!r} (it has {', '.join(keys)}). HINT: pass --key with one of those.")
    loaded = {key: tensors}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(loaded, storage_reader=reader, no_dist=True)
    return loaded[key]


def local_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes this rank holds for `tensors` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total
