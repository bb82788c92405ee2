"""The process group's lifecycle: device and backend, rendezvous with clear errors, teardown.

Its collectives, no-ops in one process, are in `collectives.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from collections.abc import Iterator

import torch
import torch.distributed as tdist

from distrib.errors import ConfigError, EnvironmentConfigError, PeerError, RendezvousError
from distrib.runtime.env import DistEnv, check_visible_gpus, detect, resolves
from distrib.runtime.ledger import ENDING, LEDGER


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    """What a rank needs to know at run time: its place in the job and its device."""

    env: DistEnv
    device: torch.device
    backend: str | None
    """`gloo`/`nccl`, or None when there is no process group (a single process)."""

    @property
    def is_rank_zero(self) -> bool:
        return self.env.is_rank_zero

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def rank(self) -> int:
        return self.env.rank


class RuntimeView:
    """Where a run is, read off the `Runtime` its holder keeps as `rt` (`Session`'s device, rank, world size)."""

    rt: Runtime

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def rank(self) -> int:
        """This process's rank, 0 to world_size - 1 (0 in one process)."""
        return self.rt.rank

    @property
    def local_rank(self) -> int:
        """This process's rank on its node (its GPU index)."""
        return self.rt.env.local_rank

    @property
    def world_size(self) -> int:
        """How many processes train together (1 in one process)."""
        return self.rt.world_size

    @property
    def is_rank_zero(self) -> bool:
        """Whether this is rank 0, the one that writes files and talks to the tracker."""
        return self.rt.is_rank_zero

    is_main_process = is_rank_zero  # Accelerate's name for it


def pick_device(requested: str, denv: DistEnv) -> torch.device:
    """`auto` -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("run.device='cuda' but torch.cuda.is_available() is False. HINT: pass --run.device cpu, or install a CUDA build of torch.")
    check_visible_gpus(denv, torch.cuda.device_count())
    return torch.device("cuda", denv.local_rank)


def pick_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend='nccl' needs CUDA devices but this run is on the CPU. HINT: pass --dist.backend gloo (or auto).")
    return requested


@contextlib.contextmanager
def distributed(
    *,
    device: str = "auto",
    backend: str = "auto",
    timeout_s: float = 600.0,
    single: bool = False,
    denv: DistEnv | None = None,
) -> Iterator[Runtime]:
    """Detect the environment, init the process group if there are several ranks, and always tear it down.

    `single=True` (debug mode) refuses to join a multi-process job instead of silently diverging.
    """
    denv = detect() if denv is None else denv
    if single and denv.distributed:
        raise EnvironmentConfigError(
            f"--debug runs one process, but the {denv.launcher} launcher started {denv.world_size} "
            "(WORLD_SIZE/SLURM_NTASKS). HINT: run `launch/debug.sh` or `python -m distrib.train --debug` "
            "directly, without torchrun or srun."
        )
    dev = pick_device(device, denv)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    name = pick_backend(backend, dev)  # validated in one process too, so a bad flag fails on a laptop
    if not denv.distributed:
        yield Runtime(env=denv, device=dev, backend=None)
        return
    if not tdist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = _round_store(denv, timeout)
            tdist.init_process_group(
                backend=name,
                init_method=None if store is not None else f"tcp://{_url_host(denv.master_addr)}:{denv.master_port}" if denv.launcher == "slurm" else "env://",
                store=store,
                rank=denv.rank,
                world_size=denv.world_size,
                timeout=timeout,
                device_id=dev if dev.type == "cuda" else None,
            )
        except (RuntimeError, ValueError, OSError) as exc:  # torch's DistError family is RuntimeError
            raise _rendezvous_error(exc, denv, timeout_s) from exc
    failed = False
    try:
        yield Runtime(env=denv, device=dev, backend=name)
    except BaseException as exc:
        failed = True
        if _is_collective_failure(exc):
            raise PeerError(
                f"rank {denv.rank}: a collective failed ({str(exc).strip().splitlines()[-1][:300]}). Another rank "
                f"most likely died or hangs: see the first error in its log. This rank exits instead of waiting "
                f"(dist.timeout_s={timeout_s:g}). HINT: under torchrun --max-restarts=N the job restarts from the "
                "newest checkpoint by itself; otherwise relaunch the same command to resume."
            ) from exc
        raise
    finally:
        # Teardown on success and on error. On success, a barrier first lets every rank's last
        # collective finish (no peer is torn down mid-operation); on error we must not wait for
        # peers that may never come, and destroy_process_group does not block on them.
        if tdist.is_initialized():
            if not failed:
                LEDGER.at(ENDING)
                with LEDGER.collective("barrier (end of the run)"):
                    tdist.barrier()
            tdist.destroy_process_group()


def side_store() -> tdist.Store | None:
    """A connection of its own to the rendezvous store, for a thread that must not share the process
    group's (the hang watchdog); None without a process group."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return None
    store = tdist.distributed_c10d._get_default_store()
    try:
        return store.clone()  # type: ignore[attr-defined]  # torch's stub lacks it
    except (AttributeError, RuntimeError, NotImplementedError):  # a store that cannot be cloned: shared, then
        return store


def _rendezvous_error(exc: BaseException, denv: DistEnv, timeout_s: float) -> RendezvousError:
    """Name what failed when the ranks could not meet, and the likely fix."""
    where = f"{denv.master_addr}:{denv.master_port}"
    text = " ".join(str(exc).split()).rstrip(".")
    lowered = text.lower()
    unset = [k for k in ("MASTER_ADDR", "MASTER_PORT") if f"{k.lower()} expected" in lowered]
    if unset:  # a hand-made launch: torch names the variable, but not the fix
        hint = (
            f"{' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set: export MASTER_ADDR=<rank 0's host> and MASTER_PORT=<a free port> "
            "in every process (torchrun and srun set them), or start the job with torchrun."
        )
    elif "address already in use" in lowered or "eaddrinuse" in lowered:
        hint = f"MASTER_PORT={denv.master_port} is taken on this host: pick a free port (or let torchrun --standalone pick one)."
    elif not resolves(denv.master_addr):  # torch reports it only as a connect timeout
        hint = f"MASTER_ADDR={denv.master_addr} does not resolve here: use a hostname or IP every node can reach (`distrib doctor` checks it)."
    elif "timed out" in lowered or "timeout" in lowered:
        hint = (
            f"not every one of the {denv.world_size} processes arrived within dist.timeout_s={timeout_s:g}: check that all were "
            f"started, with the same MASTER_ADDR/MASTER_PORT, and that {where} is reachable from every node."
        )
    else:
        hint = f"check that {where} is reachable from every node and that all {denv.world_size} processes were started (`distrib doctor`)."
    return RendezvousError(f"rank {denv.rank} of {denv.world_size} could not join the process group at {where} ({denv.launcher}): {text[:300]}. HINT: {hint}")


def _round_store(denv: DistEnv, timeout: datetime.timedelta) -> tdist.Store | None:
    """Under torchrun's agent store, a store namespace of our own per restart round.

    The agent's TCPStore outlives a restart: keys the previous round wrote (gloo's peer addresses)
    are still there, and a restarted worker may read a dead peer's address and fail to connect
    (seen with torch 2.13, --standalone, --max-restarts). A prefix per round keeps rounds apart.
    """
    if not denv.agent_store:
        return None
    base = tdist.TCPStore(denv.master_addr, denv.master_port, denv.world_size, is_master=False, timeout=timeout)
    return tdist.PrefixStore(f"distrib/round{denv.restart_count}", base)


def _is_collective_failure(exc: BaseException) -> bool:
    """A peer's death or a timeout in a collective: torch's DistError family, or gloo's RuntimeErrors."""
    if isinstance(exc, tdist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in ("gloo/transport", "Connection closed by peer", "Timed out waiting"))


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
