"""Environment detection: which launcher started us, and where this process sits in the job.

The result is one immutable `DistEnv`. Detection only reads `os.environ`; it never writes it.
Order (as in Lightning Fabric): torchrun/torchelastic first (it may run inside a Slurm step),
then Slurm's `srun` without torchrun, then a single process.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping

from distrib.errors import EnvironmentConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    """Global rank, 0 .. world_size-1."""
    local_rank: int = 0
    """Rank on this node; selects `cuda:local_rank`."""
    world_size: int = 1
    """Number of processes in the job."""
    local_world_size: int = 1
    """Number of processes on this node."""
    node_rank: int = 0
    """Index of this node."""
    master_addr: str = "127.0.0.1"
    """Address of rank 0's rendezvous store."""
    master_port: int = 29500
    """Port of rank 0's rendezvous store."""
    launcher: str = "single"
    """One of `single`, `torchrun`, `slurm`."""
    restart_count: int = 0
    """torchrun's restart round (TORCHELASTIC_RESTART_COUNT); 0 on the first run."""
    agent_store: bool = False
    """Workers share torchrun's agent TCPStore (TORCHELASTIC_USE_AGENT_STORE)."""

    @property
    def distributed(self) -> bool:
        """True when there is more than one process (and so a process group)."""
        return self.world_size > 1

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise EnvironmentConfigError(f"{name}={raw!r} is not an integer. HINT: unset {name} or set it to a whole number.") from None


def _build_env(source: str, **fields: int | str | bool) -> DistEnv:
    """Construct a DistEnv after checking that its ranks are consistent; `source` names the variables."""
    e = DistEnv(**fields)  # type: ignore[arg-type]
    if e.world_size < 1:
        raise EnvironmentConfigError(
            f"{source}: world size is {e.world_size}; expected >= 1. HINT: launch with torchrun --nproc_per_node=N or srun --ntasks=N."
        )
    if not 0 <= e.rank < e.world_size:
        raise EnvironmentConfigError(
            f"{source}: rank {e.rank} is outside 0..{e.world_size - 1} (world size {e.world_size}). "
            "HINT: RANK must be below WORLD_SIZE; let torchrun or srun set both instead of exporting them."
        )
    if not 0 <= e.local_rank < max(e.local_world_size, 1):
        raise EnvironmentConfigError(
            f"{source}: local rank {e.local_rank} is outside 0..{e.local_world_size - 1} "
            f"(local world size {e.local_world_size}). HINT: LOCAL_RANK must be below LOCAL_WORLD_SIZE."
        )
    return e


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
    if missing:
        present = {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in env}
        raise EnvironmentConfigError(
            f"Found {present} but {' and '.join(missing)} is not set. distrib needs RANK and "
            "WORLD_SIZE together. HINT: start the job with `torchrun --nproc_per_node=N ...` "
            "(it sets all of them), or unset the partial variables to run a single process."
        )
    rank = _int(env, "RANK")
    world_size = _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    local_world_size = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world_size
    return _build_env(
        "torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK)",
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        node_rank=_int(env, "GROUP_RANK") if "GROUP_RANK" in env else 0,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        launcher="torchrun",
        restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT") if "TORCHELASTIC_RESTART_COUNT" in env else 0,
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist like `scontrol show hostnames` does.

    `n[1-3,7]` -> n1 n2 n3 n7; `gpu[01-02]-ib` -> gpu01-ib gpu02-ib (zero padding kept);
    `a,b[1-2]` -> a b1 b2; several bracket groups in one name expand as a product.
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            choices = _expand_ranges(ranges, item) if ranges else [""]
            expanded = [prefix + literal + c for prefix in expanded for c in choices]
        hosts.extend(expanded)
    return [h for h in hosts if h]


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth != 0:
        raise EnvironmentConfigError(f"SLURM_JOB_NODELIST={text!r} has unbalanced brackets.")
    parts.append(current)
    return [p for p in parts if p]


def _expand_ranges(ranges: str, item: str) -> list[str]:
    out: list[str] = []
    for part in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise EnvironmentConfigError(f"Cannot parse {part!r} in the Slurm hostlist {item!r}; expected N or N-M.")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def slurm_port(job_id: str) -> int:
    """A port in 15000..34999 derived from the job id, so all tasks of a job agree on it."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 15000 + int(digits) % 20000


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    rank = _int(env, "SLURM_PROCID")
    world_size = _int(env, "SLURM_NTASKS")
    local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    node_rank = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    # SLURM_TASKS_PER_NODE looks like "2(x3),1"; the count on *this* node is what we need.
    local_world_size = (
        _int(env, "SLURM_NTASKS_PER_NODE")
        if "SLURM_NTASKS_PER_NODE" in env
        else tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "")), node_rank)
    )
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    elif nodelist:
        master_addr = expand_hostlist(nodelist)[0]
    else:
        raise EnvironmentConfigError(
            "Running under srun but SLURM_JOB_NODELIST is not set, so the master address is unknown. HINT: export MASTER_ADDR=<first node's hostname>."
        )
    if "MASTER_PORT" in env:
        master_port = _int(env, "MASTER_PORT")
    else:
        master_port = slurm_port(env.get("SLURM_JOB_ID", "0"))
    return _build_env(
        "Slurm environment (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID)",
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        # SLURM_TASKS_PER_NODE can be coarser than the step's layout; never below this task's slot.
        local_world_size=max(local_world_size, local_rank + 1),
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        launcher="slurm",
    )


def tasks_on_node(spec: str, node: int) -> int:
    """Parse SLURM_TASKS_PER_NODE (e.g. `2(x3),1`) and return the count for node `node`."""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return 1
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts[node] if node < len(counts) else 1


def _is_torchrun(env: Mapping[str, str]) -> bool:
    return any(k in env for k in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _is_srun(env: Mapping[str, str]) -> bool:
    # A batch script has SLURM_PROCID too; only a step launched by srun has a step id.
    # The interactive `salloc` shell is excluded the same way.
    return "SLURM_PROCID" in env and "SLURM_NTASKS" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)


def detect(env: Mapping[str, str] | None = None) -> DistEnv:
    """Detect the launcher and this process's place in the job from environment variables."""
    env = os.environ if env is None else env
    if _is_torchrun(env):
        return _from_torchrun(env)
    if _is_srun(env):
        return _from_slurm(env)
    return DistEnv()


def check_visible_gpus(denv: DistEnv, visible: int) -> None:
    """Fail early when this rank's GPU does not exist (a classic LOCAL_RANK/CUDA_VISIBLE_DEVICES slip)."""
    if denv.local_rank >= visible:
        raise EnvironmentConfigError(
            f"{denv.launcher}: local rank {denv.local_rank} needs cuda:{denv.local_rank}, but only "
            f"{visible} GPU(s) are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). "
            f"HINT: start at most {visible} processes per node (torchrun --nproc_per_node={visible}, "
            f"or sbatch --ntasks-per-node={visible}), or set run.device=cpu."
        )


def resolves(host: str) -> bool:
    """Whether `host` resolves to an address here (a typo in MASTER_ADDR does not; torch reports it only as a timeout)."""
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        return False
    return True
