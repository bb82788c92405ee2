"""What a checkpoint stores of an object, by the methods the object has.

`Session.save(state)` takes a mapping of names to objects. Each is stored by the first of these that
fits, and `Session.load(state)` restores it the same way:

- an `nn.Module` (DDP, FSDP or compiled wrappers are unwrapped): its plain `state_dict()`;
- `Stateful` (optimizers, schedulers, loaders, `Metrics`, callbacks): `state_dict()` and, on resume,
  `load_state_dict(state)`;
- anything else: the value itself, replaced in the `state` mapping on resume.

Where it goes:

- replicated state (the same on every rank) is written once, by rank 0, to `state.pt`;
- `PerRank` objects (`distrib_per_rank = True`: each rank holds its own share, like `Metrics`' sums)
  go to each rank's `rank-NNNNN.pt`, and start fresh when the world size changes;
- `RankStateful` objects are replicated but also have a part only their rank knows (a `TrainLoader`
  reading a stream: each rank's position in its shard), also kept in the rank's file;
- under `dist.strategy=fsdp`, models and optimizers are DCP shards in `sharded/` (`sharded.py`).
"""

from __future__ import annotations

from typing import Any, Protocol, TypeGuard, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    """An object checkpointed through its state dict (the torch.distributed.checkpoint convention)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


@runtime_checkable
class RankStateful(Protocol):
    """Replicated state plus a part of its own on each rank; `rank_state_dict()` may return None (nothing to keep)."""

    def rank_state_dict(self) -> Any | None: ...

    def load_rank_state_dict(self, state: Any) -> None: ...


class PerRank(Protocol):
    """An object whose whole state differs per rank: it sets the class attribute `distrib_per_rank = True`."""

    distrib_per_rank: bool


def is_per_rank(value: object) -> TypeGuard[PerRank]:
    """Whether `value` is saved in each rank's file rather than once for the job (`PerRank`)."""
    return bool(getattr(value, "distrib_per_rank", False))
