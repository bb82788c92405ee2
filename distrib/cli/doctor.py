"""`distrib doctor`: what distrib sees in this process, and the classic launch mistakes with their fix.

Run it the way the job runs (`srun distrib doctor`, `torchrun ... -m distrib.doctor`, or plainly).
`diagnose()` is a pure function of the environment and a few probes, so every rule is testable.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
from collections.abc import Callable, Mapping, Sequence

from distrib.cli.launch_checks import Elastic, Finding, elastic_findings, env_int, mesh_findings
from distrib.config import STRATEGIES, DistConfig
from distrib.errors import CommandParser, ConfigError, EnvironmentConfigError, error_exit
from distrib.runtime.env import DistEnv, detect, expand_hostlist, resolves, tasks_on_node


@dataclasses.dataclass(frozen=True, kw_only=True)
class Probes:
    """What doctor measures outside the environment variables (replaceable in tests)."""

    gpus: int = 0
    gpu_names: tuple[str, ...] = ()
    device_memory: int = 0
    """Bytes of memory of one device: the first GPU's, else this host's RAM."""
    torch_version: str = ""
    nccl_version: str | None = None
    port_in_use: Callable[[str, int], bool] = lambda host, port: False
    resolves: Callable[[str], bool] = lambda host: True
    is_local: Callable[[str], bool] = lambda host: True


def real_probes() -> Probes:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nccl = None
    if gpus and torch.distributed.is_nccl_available():
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    memory = torch.cuda.get_device_properties(0).total_memory if gpus else _host_memory()
    return Probes(
        gpus=gpus,
        gpu_names=tuple(torch.cuda.get_device_name(i) for i in range(gpus)),
        device_memory=memory,
        torch_version=torch.__version__,
        nccl_version=nccl,
        port_in_use=_port_in_use,
        resolves=resolves,
        is_local=_is_local,
    )


def _host_memory() -> int:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def strategy_advice(device_memory: int, world_size: int, on_gpu: bool) -> str:
    """When to pick dist.strategy=fsdp: the largest model whose fp32 AdamW training state fits one device each way."""
    if not device_memory:
        return "ddp (default) while the model, its gradients and optimizer state fit one device; else --dist.strategy fsdp"
    # fp32 AdamW holds 16 bytes a parameter (weights, gradients, two moments); FSDP splits them over
    # the ranks. Activations come on top, so these are upper bounds.
    ddp = device_memory / 16
    where = "this GPU" if on_gpu else "this host's RAM"
    line = f"ddp (default) holds about 16 bytes a parameter (fp32 AdamW): up to ~{ddp / 1e9:.2g}B parameters in {where}, before activations"
    if world_size > 1:
        line += f"; --dist.strategy fsdp splits them over {world_size} ranks: up to ~{ddp * world_size / 1e9:.2g}B"
    else:
        line += "; beyond that, --dist.strategy fsdp with N ranks holds 1/N each"
    if not on_gpu:
        line += " (ranks on one host share its RAM: on CPU fsdp helps across nodes)"
    return line + ". fsdp costs a parameter all-gather per block in forward and backward"


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _is_local(host: str) -> bool:
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs & {"127.0.0.1", "::1"}) or host in (socket.gethostname(), socket.getfqdn())


def diagnose(
    env: Mapping[str, str], probes: Probes, dist: DistConfig | None = None, elastic: Elastic | None = None
) -> tuple[list[tuple[str, str]], list[Finding]]:
    """(facts as (name, value) rows, findings) for this process's environment (and the run's dist.* and batch keys)."""
    facts: list[tuple[str, str]] = []
    found: list[Finding] = []
    try:
        denv = detect(env)
    except EnvironmentConfigError as exc:
        found.append(Finding("error", str(exc), "see the HINT above"))
        denv = DistEnv()
    facts += [
        ("launcher", denv.launcher),
        ("rank", f"{denv.rank} of {denv.world_size} (local {denv.local_rank} of {denv.local_world_size}, node {denv.node_rank})"),
        ("torch", probes.torch_version or "?"),
        ("devices", f"{probes.gpus} CUDA GPU(s): {', '.join(probes.gpu_names)}" if probes.gpus else "no CUDA GPU: CPU"),
        ("backend", "nccl" if probes.gpus else "gloo"),
        ("nccl", probes.nccl_version or "-"),
        ("strategy", strategy_advice(probes.device_memory, denv.world_size, bool(probes.gpus))),
    ]
    found += mesh_findings(facts, denv, dist or DistConfig())

    in_slurm = "SLURM_JOB_ID" in env
    nnodes = env_int(env, "SLURM_JOB_NUM_NODES") or env_int(env, "SLURM_NNODES") or 1
    gpus_on_node = env_int(env, "SLURM_GPUS_ON_NODE") or 0
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    step_tasks_here = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""), env_int(env, "SLURM_NODEID") or 0)
    if in_slurm:
        facts.append(
            (
                "slurm",
                f"job {env['SLURM_JOB_ID']}: {nnodes} node(s) {env.get('SLURM_JOB_NODELIST', '?')}, "
                f"{env.get('SLURM_NTASKS', '?')} task(s) ({env.get('SLURM_TASKS_PER_NODE', '?')} per node), "
                f"{gpus_on_node or 'no'} GPU(s) per node" + (f", step {env.get('SLURM_STEP_ID', env.get('SLURM_STEPID'))}" if in_step else ", batch shell"),
            )
        )
    else:
        facts.append(("slurm", "no allocation"))

    torchrun = denv.launcher == "torchrun" and "TORCHELASTIC_RUN_ID" in env
    # torchrun started by several srun tasks on one node: every task's agent starts its own workers.
    if torchrun and in_step and step_tasks_here > 1:
        found.append(
            Finding(
                "error",
                f"torchrun runs inside an srun step with {step_tasks_here} tasks on this node: each task's agent starts "
                f"--nproc_per_node processes, so the node runs {step_tasks_here}x too many (a double launch).",
                "with torchrun use one task per node (srun --ntasks-per-node=1, as slurm/train.sbatch does); or drop "
                "torchrun and let srun start one task per GPU (slurm/srun.sbatch)",
            )
        )
    # --ntasks is per job, --ntasks-per-node per node; on several nodes they are easy to confuse.
    ntasks = env_int(env, "SLURM_NTASKS")
    if in_slurm and not torchrun and nnodes > 1 and gpus_on_node and ntasks and "SLURM_NTASKS_PER_NODE" not in env:
        if ntasks < nnodes * gpus_on_node:
            found.append(
                Finding(
                    "error",
                    f"SLURM_NTASKS={ntasks} is the whole job's task count: over {nnodes} nodes with {gpus_on_node} GPUs "
                    f"each that leaves {nnodes * gpus_on_node - ntasks} GPU(s) idle.",
                    f"ask for --ntasks-per-node={gpus_on_node} (per node) instead of --ntasks={ntasks}",
                )
            )
    # The world size the launcher set against what the allocation provides.
    if in_slurm and gpus_on_node and denv.world_size > 1 and denv.world_size != nnodes * gpus_on_node:
        found.append(
            Finding(
                "warning",
                f"world size {denv.world_size} does not match the allocation: {nnodes} node(s) x {gpus_on_node} GPU(s) = {nnodes * gpus_on_node}.",
                "start one process per allocated GPU (torchrun --nproc_per_node=$SLURM_GPUS_ON_NODE, or srun --ntasks-per-node=$SLURM_GPUS_ON_NODE)",
            )
        )
    if probes.gpus and denv.local_world_size > probes.gpus:
        found.append(
            Finding(
                "error",
                f"{denv.local_world_size} processes on this node but only {probes.gpus} GPU(s) are visible.",
                f"start at most {probes.gpus} processes per node",
            )
        )

    # Slurm's batch shell has the job's variables but is one process: training there would not use the tasks.
    if in_slurm and not in_step and not torchrun and denv.launcher == "single" and (ntasks or 1) > 1:
        found.append(
            Finding(
                "error",
                f"this is the batch shell of Slurm job {env['SLURM_JOB_ID']} ({ntasks} tasks), not an srun step: a training "
                "started here runs as 1 process and leaves the other tasks idle.",
                "start it with srun (`srun python -m distrib.train ...`, as slurm/srun.sbatch does) or under torchrun (slurm/train.sbatch)",
            )
        )
    # A hand-made multi-process environment must say where rank 0 is.
    if denv.launcher == "torchrun" and not torchrun and denv.world_size > 1:
        unset = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if unset:
            found.append(
                Finding(
                    "error",
                    f"WORLD_SIZE={denv.world_size} but {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set: the ranks "
                    "cannot find rank 0 (distrib would try 127.0.0.1:29500, which works only when every rank runs on this host).",
                    "export MASTER_ADDR=<rank 0's host> MASTER_PORT=<a free port> on every rank, or launch with torchrun",
                )
            )
    # Master address and port.
    addr, port = denv.master_addr, denv.master_port
    if denv.launcher == "single" and in_slurm and env.get("SLURM_JOB_NODELIST"):
        try:
            addr = expand_hostlist(env["SLURM_JOB_NODELIST"])[0]
        except (EnvironmentConfigError, IndexError) as exc:
            if not any("SLURM_JOB_NODELIST" in f.message for f in found):
                found.append(
                    Finding(
                        "error",
                        f"SLURM_JOB_NODELIST={env['SLURM_JOB_NODELIST']!r} is malformed: {exc}",
                        "unset it, or run inside a real Slurm allocation (Slurm sets it)",
                    )
                )
    addr = env.get("MASTER_ADDR", addr)
    port = env_int(env, "MASTER_PORT") or port
    facts.append(("master", f"{addr}:{port}"))
    if not 0 < port < 65536:
        found.append(Finding("error", f"MASTER_PORT={port} is not a TCP port.", "export MASTER_PORT=<a free port between 1024 and 65535>"))
    elif not probes.resolves(addr):
        found.append(Finding("error", f"MASTER_ADDR={addr} does not resolve on this host.", "use a hostname or IP every node can reach"))
    elif probes.is_local(addr) and not torchrun and denv.rank == 0 and probes.port_in_use(addr, port):
        # Under torchrun the agent's store listens there already; elsewhere rank 0 is about to bind it.
        found.append(
            Finding(
                "error",
                f"MASTER_PORT={port} is already in use on {addr}: rank 0 cannot open its store there.",
                f"export MASTER_PORT=<a free port, e.g. {_free_port()}>, or stop the process holding it",
            )
        )
    found += elastic_findings(facts, env, denv, elastic or Elastic(), probes.gpus)
    return facts, found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> int:
    import os

    # The dist.* keys that decide the mesh; argparse gives it --help and refuses a typo rather than running the checks.
    parser = CommandParser(
        prog="distrib doctor",
        allow_abbrev=False,
        description="Print what distrib sees (launcher, ranks, devices, Slurm, master address and port, the mesh "
        "a launch builds) and flag launch mistakes, each with its fix. Exit 1 on an error found.",
    )
    parser.add_argument("--dist.strategy", dest="strategy", choices=STRATEGIES, default="ddp", help="the run's dist.strategy (default ddp)")
    parser.add_argument("--dist.replicate", dest="replicate", type=int, default=1, help="the run's dist.replicate (HSDP replicas; default 1)")
    parser.add_argument("--nnodes", help="torchrun's --nnodes; MIN:MAX is an elastic launch (default: $NNODES)")
    parser.add_argument("--train.global_batch_size", dest="global_batch_size", type=int, help="the run's train.global_batch_size")
    parser.add_argument("--train.batch_size", dest="batch_size", type=int, default=64, help="the run's train.batch_size (default 64)")
    args = parser.parse_args(argv)
    try:
        dist = DistConfig(strategy=args.strategy, replicate=args.replicate)
    except ConfigError as exc:
        raise SystemExit(error_exit(str(exc))) from None
    try:
        elastic = Elastic(nnodes=args.nnodes, global_batch_size=args.global_batch_size, batch_size=args.batch_size)
        facts, found = diagnose(os.environ, real_probes(), dist, elastic)
    except Exception as exc:  # the doctor must report, never crash: say what it could not check
        print(
            f"distrib doctor could not finish its checks: {type(exc).__name__}: {exc}\n"
            "  fix: check the variables named above (env | grep -E 'SLURM|RANK|WORLD|MASTER'); unset what you exported by hand",
            flush=True,
        )
        return 1
    rank = dict(facts)["rank"].split(" ")[0]
    prefix = f"[rank{rank}] " if " of 1 " not in dict(facts)["rank"] else ""  # one block per rank under srun
    width = max(len(k) for k, _ in facts)
    lines = [f"{name:<{width}}  {value}" for name, value in facts]
    lines += [f"{f.level.upper()}: {f.message}\n  fix: {f.fix}" for f in found] or ["no problems found"]
    print("\n".join(prefix + line for line in "\n".join(lines).splitlines()), flush=True)
    return 1 if any(f.level == "error" for f in found) else 0


if __name__ == "__main__":
    sys.exit(main())
