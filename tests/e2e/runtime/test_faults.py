"""A rank that dies or hangs outside torchrun: the others exit with a clear error within dist.timeout_s,
and a rank killed mid-checkpoint never leaves a checkpoint that looks complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from distrib.checkpoint import store as ck
from distrib.errors import PeerError
from distrib.runtime.group import distributed
from tests.helpers import REPO, child_env, free_port

TIMEOUT_S = 5


def _start_ranks(run_dir: Path) -> list[subprocess.Popen]:
    """Two ranks started by hand (RANK/WORLD_SIZE/MASTER_*), with no torchrun agent to clean up after them."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, "-m", "distrib.train", "--train.epochs", "200", "--dist.timeout_s", str(TIMEOUT_S), "--run.dir", str(run_dir)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_the_surviving_rank_exits_with_a_clear_error_within_the_timeout(tmp_path, fault):
    rank0, rank1 = _start_ranks(tmp_path / "run")
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "run" / "checkpoints").glob("step-*[0-9]")):  # training is under way
            assert time.monotonic() < deadline and rank0.poll() is None
            time.sleep(0.05)
        rank1.send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = rank0.communicate(timeout=TIMEOUT_S + 60)
        waited = time.monotonic() - t0
    finally:
        rank1.kill()
        rank0.kill()
        rank1.communicate()
    assert rank0.returncode == PeerError.exit_code == 1, out[-2000:]
    assert "distrib: error: rank 0: a collective failed" in out and "Another rank most likely died or hangs" in out
    assert f"dist.timeout_s={TIMEOUT_S}" in out
    # A dead peer is noticed at once (the socket closes); a hung one when the collective times out.
    assert waited < TIMEOUT_S + 15, waited
    if fault == "hung":
        assert "Timed out" in out and waited >= TIMEOUT_S - 1


class _DieWhileSerialised:
    """SIGKILLs its own process when torch.save reaches it: a rank killed in the middle of its write."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


def _save_twice(rank: int, world_size: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    try:
        with distributed(device="cpu", timeout_s=TIMEOUT_S):
            shared = {"w": torch.arange(1000.0)}
            ck.save(Path(root), 10, rank=rank, world_size=world_size, keep=3, shared=shared, per_rank={"rank": rank})
            doomed = {"rank": rank, "bad": _DieWhileSerialised()} if rank == 1 else {"rank": rank}
            ck.save(Path(root), 20, rank=rank, world_size=world_size, keep=3, shared=shared, per_rank=doomed)
        result = "saved"
    except PeerError as exc:
        result = f"PeerError: {exc}"
    Path(out, f"rank{rank}.txt").write_text(result)


def test_a_rank_killed_while_saving_never_leaves_a_complete_looking_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    root = tmp_path / "checkpoints"
    ctx = mp.start_processes(_save_twice, args=(2, str(root), str(tmp_path)), nprocs=2, start_method="spawn", join=False)
    for p in ctx.processes:
        p.join(TIMEOUT_S + 60)
    assert ctx.processes[1].exitcode == -signal.SIGKILL
    assert ctx.processes[0].exitcode == 0
    assert (tmp_path / "rank0.txt").read_text().startswith("PeerError: rank 0: a collective failed")
    # Rank 0 wrote state.pt for step 20, but with rank 1's file missing it never wrote the manifest
    # or renamed the directory: step 20 does not exist, step 10 is the newest good checkpoint.
    assert (ck.staging_dir(root, 20) / "state.pt").exists()
    assert [p.name for p in ck.candidates(root)] == ["step-000000010"]
    assert ck.newest_good(root)[1]["step"] == 10
