"""What a launch builds, as `distrib doctor` explains it: the mesh the dist.* keys make at this world
size, and an elastic node range (torchrun --nnodes MIN:MAX) with the global batch's split at every
world size it can reach. Pure functions of the environment, like the rest of doctor's rules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from distrib.config import DistConfig
from distrib.data.split import nearest_multiples, split_global_batch
from distrib.errors import ConfigError
from distrib.parallel.fsdp import describe_mesh
from distrib.runtime.env import DistEnv


@dataclasses.dataclass(frozen=True)
class Finding:
    level: str
    """`error` (the job will fail or silently misbehave) or `warning`."""
    message: str
    fix: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Elastic:
    """What doctor needs to judge an elastic launch: the node range and the run's batch keys."""

    nnodes: str | None = None
    """torchrun's --nnodes (`MIN:MAX` is elastic); None: $NNODES, as launch/multinode.sh reads it."""
    global_batch_size: int | None = None
    batch_size: int = 64


def elastic_findings(facts: list[tuple[str, str]], env: Mapping[str, str], denv: DistEnv, e: Elastic, gpus: int = 0) -> list[Finding]:
    """An elastic launch's node range, restarts, and the global batch's split at every world size it can reach
    (processes per node: the launch's, else $NPROC_PER_NODE, else this node's GPUs, as launch/multinode.sh counts)."""
    nnodes = e.nnodes or env.get("NNODES", "")
    low, _, high = nnodes.partition(":")
    if not high or not (low.isdigit() and high.isdigit()) or int(low) >= int(high):
        return []
    per_node = denv.local_world_size if denv.local_world_size > 1 else env_int(env, "NPROC_PER_NODE") or gpus or 1
    worlds = [n * per_node for n in range(int(low), int(high) + 1)]
    restarts = env.get("TORCHELASTIC_MAX_RESTARTS") or env.get("MAX_RESTARTS") or "3 (launch/multinode.sh's default when elastic)"
    facts.append(
        (
            "elastic",
            f"{low} to {high} nodes x {per_node} process{'es' if per_node > 1 else ''} (world sizes {', '.join(map(str, worlds))}), max restarts {restarts}: "
            "a lost node restarts the group from the newest checkpoint; a joining node stops it with SIGTERM (a checkpoint) "
            "and restarts it larger",
        )
    )
    found = []
    every = math.lcm(*worlds)  # the global batches that split at every world size are its multiples
    if env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        found.append(
            Finding(
                "warning",
                "a node that joins a running elastic group waits forever for the new round's store address while the agents "
                "share their rendezvous store with the workers (torch's default; pytorch issue #135712).",
                "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/multinode.sh does when NNODES is MIN:MAX)",
            )
        )
    if e.global_batch_size is None:
        found.append(
            Finding(
                "warning",
                f"without train.global_batch_size each world size trains another global batch (train.batch_size={e.batch_size} x "
                "grad_accum x processes), so a lost or added node changes the run's trajectory.",
                f"pass --train.global_batch_size {every * math.ceil(e.batch_size * worlds[0] / every)} (it splits at every world size "
                "from the range; docs/elastic.md)",
            )
        )
        return found
    splits, bad = [], []
    for world in worlds:
        try:
            split = split_global_batch(e.global_batch_size, max_micro_batch=e.batch_size, world_size=world)
            splits.append(f"{world}: {split.micro_batch} x {split.grad_accum}")
        except ConfigError:
            bad.append(world)
    shown = ", ".join(splits) + " (processes: micro-batch x grad_accum)" if splits else "splits at no world size"
    facts.append(("global batch", f"{e.global_batch_size} at {shown}"))
    if bad:
        sizes = f"a multiple of {every}, which each of the world sizes {', '.join(map(str, worlds))} divides"
        fix = (
            f"pass --train.global_batch_size {' or '.join(map(str, nearest_multiples(e.global_batch_size, every)))} ({sizes})"
            if every <= 64 * worlds[-1]
            else f"narrow the node range (NNODES=MIN:MAX): no practical global batch splits over all of {', '.join(map(str, worlds))} ({sizes})"
        )
        found.append(
            Finding(
                "error",
                f"train.global_batch_size={e.global_batch_size} does not split evenly over {', '.join(map(str, bad))} processes: a "
                "group restarted at that size would exit 2.",
                fix,
            )
        )
    return found


def mesh_findings(facts: list[tuple[str, str]], denv: DistEnv, dist: DistConfig) -> list[Finding]:
    """The mesh a launch with these dist.* keys builds (a `mesh` fact), and a multi-node FSDP that would cross the network."""
    world, local = denv.world_size, denv.local_world_size
    nodes = world // local if local and world % local == 0 else 1
    if dist.strategy == "fsdp" and world == 1 and (dist.replicate > 1 or dist.fsdp_offload):
        key = f"dist.replicate={dist.replicate}" if dist.replicate > 1 else "dist.fsdp_offload=true"
        facts.append(("mesh", "FSDP in 1 process: nothing to shard or reduce"))
        return [
            Finding(
                "error",
                f"{key} needs several ranks, and this process is 1 of 1.",
                "run doctor as the job runs (torchrun ... -m distrib.doctor, srun distrib doctor)",
            )
        ]
    if dist.strategy == "ddp" or world == 1:
        what = "DDP" if dist.strategy == "ddp" else "FSDP"
        facts.append(("mesh", f"{what} in 1 process: nothing to shard or reduce" if world == 1 else f"DDP: all {world} ranks hold the whole model"))
        return []
    try:
        facts.append(("mesh", describe_mesh(world, dist.replicate, local)))
    except ConfigError as exc:
        return [Finding("error", str(exc).split(" HINT:")[0], f"pass --dist.replicate with a divisor of {world}, e.g. {nodes} (one replica per node)")]
    if nodes > 1 and dist.replicate == 1:
        return [
            Finding(
                "warning",
                f"FSDP shards over all {world} ranks on {nodes} nodes: every block's reduce-scatter and all-gather cross the network.",
                f"pass --dist.replicate {nodes} (HSDP: shard within each node, all-reduce across nodes once per step)",
            )
        ]
    return []


def env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "")
    return int(value) if value.isdigit() else None
