"""Real multi-process helpers: spawned ranks on gloo over loopback, and torchrun in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from distrib.checkpoint import store as ck
from distrib.cli.task import TaskConfig, TaskDataConfig
from distrib.config import config_class

TaskData = config_class({"task": TaskConfig, "data": TaskDataConfig})
"""The built-in task's model and data keys without its `optim` section: for tests that pass their own optimizer."""

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, fn: Callable[..., Any], world_size: int, port: int, out: str, args: tuple) -> None:
    # Only the child's environment: the parent (pytest) is never touched.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    result = fn(rank, world_size, *args)
    torch.save(result, Path(out) / f"rank{rank}.pt")


def spawn(fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` real processes; return each rank's result."""
    out = tmp_path / f"spawn-{fn.__name__}"
    out.mkdir(parents=True, exist_ok=True)
    # forkserver: each rank is forked from a server that imported torch and distrib once (a fresh interpreter
    # per rank costs ~2 s of CPU), and never from pytest itself (fork after OpenMP or gloo threads is unsafe).
    mp.set_forkserver_preload(["torch", "distrib", "tests.helpers"])
    mp.start_processes(_child, args=(fn, world_size, free_port(), str(out), args), nprocs=world_size, start_method="forkserver")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_train(
    args: list[str], *, nproc: int = 1, cwd: Path | None = None, check: bool = True, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m distrib.train ARGS` (nproc=1) or `torchrun --nproc_per_node=N -m distrib.train ARGS`."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "distrib.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "distrib.train", *args]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def rewind(run_dir: Path, step: int) -> None:
    """As if a finished run had died right after `step`: drop the later checkpoints and the summary."""
    for later in ck.candidates(run_dir / "checkpoints"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    (run_dir / "summary.json").unlink()


# ----------------------------------------------------------------------------- process trees (signals, kills)


def descendants(pid: int) -> list[int]:
    kids = [int(k) for k in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    return kids + [d for k in kids for d in descendants(k)]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker (workers do not share the agent's process group in torch 2.13)."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") and "zombie" not in proc_state(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def proc_state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/status").read().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def wait_for_checkpoints(run_dir, count: int) -> None:
    deadline = time.monotonic() + 120
    while len(list((run_dir / "checkpoints").glob("step-*[0-9]"))) < count and time.monotonic() < deadline:
        time.sleep(0.02)


def wait_for_training(run, proc) -> None:
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or '"train"' not in (run / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)


def all_gone(pids: list[int], within_s: float = 15) -> list[int]:
    """The pids still running after `within_s` (DataLoader workers notice a dead parent within ~5 s)."""
    deadline = time.monotonic() + within_s
    while (alive := [p for p in pids if os.path.exists(f"/proc/{p}") and "zombie" not in proc_state(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive
