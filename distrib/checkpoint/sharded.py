"""The FSDP checkpoint format: models and optimizers through `torch.distributed.checkpoint` (DCP).

Under `dist.strategy=fsdp` a checkpoint keeps modules and optimizers as DCP shards in `sharded/`
(`.metadata` and one `__<rank>_0.distcp` per rank), each rank writing its own, and reads them back
at any world size (DCP reshards). The rest of the state goes to `state.pt` and the rank files as
under DDP (`store.py`). `convert` turns a sharded checkpoint into a plain `state_dict`, in one
process, so no distrib is needed to use the model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distrib.errors import ConfigError
from distrib.parallel.fsdp import is_sharded, reshard

SHARDED_DIR = "sharded"
"""A checkpoint's DCP directory: `.metadata` and one `__<rank>_0.distcp` file per rank."""


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
    if not state:  # DDP: importing DCP (~60 ms) would stall the step of the first checkpoint for nothing
        return {}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out: dict[str, Any] = {}
    for model in models:
        if is_sharded(model):
            reshard(model)
    for key, value in state.items():
        if isinstance(value, nn.Module):
            out[key] = _rank0_buffers(get_model_state_dict(value))
        elif isinstance(value, torch.optim.Optimizer):
            out[key] = get_optimizer_state_dict(_owner(value, models), value)
    return out


def _rank0_buffers(state: dict[str, Any]) -> dict[str, Any]:
    """The state with its unsharded tensors (buffers) as rank 0 has them, as DDP checkpoints them.

    DCP writes one copy of a tensor every rank holds, from whichever rank it picks; BatchNorm's
    running statistics differ per rank between forwards, so each rank takes rank 0's copy first.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return state
    out = dict(state)
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and not hasattr(v, "full_tensor"):
            out[k] = v.detach().clone()
            dist.broadcast(out[k], src=0)
    return out


def layout(value: Any) -> dict[str, Any]:
    """What a resume compares before loading (`distrib.checkpoint.resume.incompatibilities`): shapes and groups, no data."""
    if isinstance(value, nn.Module):
        return {"shapes": {k: list(v.shape) for k, v in value.state_dict().items() if hasattr(v, "shape")}}
    return {"param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(g["params"])))} for g in value.param_groups]}


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
    with _one_process_is_fine():
        dcp.save(dict(state), storage_writer=dcp.FileSystemWriter(path, sync_files=True), process_group=group)


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """Silence DCP's "torch.distributed is disabled ... assuming ... a single process" warning: it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*", category=UserWarning)
        yield


def load_sharded(path: Path, state: Mapping[str, Any], models: Sequence[nn.Module]) -> None:
    """Load `path`'s shards into the modules and optimizers of `state` (resharded to this world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    reader = dcp.FileSystemReader(path)
    saved = set(reader.read_metadata().state_dict_metadata)
    current = sharded_state(state, models)
    with _one_process_is_fine():
        # Partial: a fresh optimizer has state for every parameter (torch creates it to load into), the
        # checkpoint only for those that had a gradient; the others are pruned again below.
        dcp.load(current, storage_reader=reader, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    for key, value in state.items():
        if isinstance(value, nn.Module):
            set_model_state_dict(value, current[key])
        elif isinstance(value, torch.optim.Optimizer):
            owner = _owner(value, models)
            set_optimizer_state_dict(owner, value, current[key])
            for name, param in owner.named_parameters():
                if not any(k.startswith(f"{key}.state.{name}.") for k in saved):
                    value.state.pop(param, None)  # no state in the checkpoint: none now, as in the uninterrupted run


def load_whole(value: nn.Module | torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """Load a state_dict saved whole (dist.strategy=ddp) into a sharded module or optimizer: each rank keeps its shards.

    An optimizer's state tensors shaped like their parameter (AdamW's moments) are cut like it: setup keeps the
    optimizer's parameter order when it points it at the shards, so position i of a group is the same parameter.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(value, nn.Module):
        set_model_state_dict(value, dict(saved), options=StateDictOptions(full_state_dict=True))
        return

    def cut(t: Any, param: torch.Tensor) -> Any:
        if isinstance(param, DTensor) and isinstance(t, torch.Tensor) and t.shape == param.shape and t.dim() > 0:
            # Every rank read the whole tensor: each keeps its own piece, nothing is sent.
            return distribute_tensor(t.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        return t

    state: dict[Any, Any] = {}
    for group, saved_group in zip(value.param_groups, saved["param_groups"]):
        for index, param in zip(saved_group["params"], group["params"]):
            if index in saved["state"]:
                state[index] = {k: cut(v, param) for k, v in saved["state"][index].items()}
    value.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def convert(checkpoint: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """The plain `state_dict` of `key` (a module) from a sharded checkpoint, in one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(checkpoint / SHARDED_DIR)
    meta = reader.read_metadata().state_dict_metadata
    prefix = f"{key}."
    tensors = {
        k[len(prefix) :]: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    if not tensors:
        keys = sorted({k.split(".", 1)[0] for k in meta})
        raise ConfigError(f"{checkpoint} holds no sharded {key!r} (it has {', '.join(keys)}). HINT: pass --key with one of those.")
    loaded = {key: tensors}
    with _one_process_is_fine():
        dcp.load(loaded, storage_reader=reader, no_dist=True)
    return loaded[key]
