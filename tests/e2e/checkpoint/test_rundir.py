"""Bad inputs and hazards, one table each: the command, its exit status, the message, and what is on disk after.

Bad input exits 2 with `distrib: error:`, the field and the fix, and writes nothing (no run.dir, or
the existing one byte-for-byte as it was). Failures of the environment (the ranks cannot meet)
exit 1. Everything runs for real: the CLI's `main` in this process where no process group is
involved, real subprocesses, real ports and real file locks otherwise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distrib.checkpoint.rundir import LOCK_FILE, RunLock
from distrib.cli.train import main
from distrib.errors import ConfigError
from tests.helpers import REPO, child_env, free_port, read_metrics, read_summary, rewind, run_train
from tests.unit.checkpoint.test_rundir import (  # the helpers both halves of this test module use
    SAME,
    SMALL,
    _copy,
    _said,
    tree,
)

# --------------------------------------------------------------------------- batches that cannot fit


# --------------------------------------------------------------------------- resuming what does not match


# --------------------------------------------------------------------------- one writer per run.dir


def test_a_second_run_on_a_live_run_dir_exits_2_naming_the_holder(tmp_path, capsys, finished):
    run = _copy(finished, tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from distrib.checkpoint.rundir import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
            str(run),
        ],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(run)
        assert main([*SMALL, *SAME, "--run.dir", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (host {socket.gethostname()}, pid {holder.pid}" in err, err
        assert tree(run) == before
    finally:
        holder.kill()
        holder.wait()
    # Its holder died without cleaning up (SIGKILL): the lock is stale and the next run takes it over.
    assert (run / LOCK_FILE).exists()
    assert main([*SMALL, *SAME, "--run.dir", str(run)]) == 0
    assert f"taking over the lock left by host {socket.gethostname()}, pid {holder.pid}" in _said(capsys)
    assert not (run / LOCK_FILE).exists()


def test_a_forked_child_that_outlives_the_holder_does_not_hold_the_lock(tmp_path):
    """DataLoader workers are forked from rank 0 and may outlive a killed rank for a moment."""
    code = (
        "import os, sys, time; from distrib.checkpoint.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
        "child = os.fork()\nif child == 0: time.sleep(30); os._exit(0)\nprint(child, flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], cwd=REPO, env=child_env(), stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            RunLock(tmp_path / "run").acquire()
        holder.kill()
        holder.wait()
        assert os.path.exists(f"/proc/{child}")  # the child still runs, with the lock file open
        lock = RunLock(tmp_path / "run")
        lock.acquire()  # at once: the lock went with its holder
        lock.release()
    finally:
        os.kill(child, 9)


# --------------------------------------------------------------------------- torn metrics


# --------------------------------------------------------------------------- the environment


def _rank_alone(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distrib.train", *SMALL, "--dist.timeout_s", "3", "--run.dir", str(tmp_path / "never")]
    return subprocess.run(cmd, cwd=REPO, env=child_env(WORLD_SIZE="2", **env), capture_output=True, text=True, timeout=120)


def test_rendezvous_failures_exit_1_with_the_address_and_a_hint(tmp_path):
    port = free_port()
    never = _rank_alone(tmp_path, RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    unresolvable = _rank_alone(tmp_path, RANK="1", MASTER_ADDR="no-such-host.invalid", MASTER_PORT=str(port))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        in_use = _rank_alone(tmp_path, RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for proc, needle in (
        (never, "not every one of the 2 processes arrived within dist.timeout_s=3"),
        (unresolvable, "MASTER_ADDR=no-such-host.invalid does not resolve"),
        (in_use, f"MASTER_PORT={port} is taken"),
    ):
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "distrib: error: rank" in proc.stderr and "could not join the process group" in proc.stderr and needle in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------- world size


def test_a_one_process_checkpoint_resumed_on_two_completes_the_same_epochs(tmp_path):
    args = [*SMALL, "--data.train_size", "1024", "--train.epochs", "2", "--ckpt.every", "5", "--ckpt.keep", "100", "--train.log_every", "1"]
    run = tmp_path / "run"
    run_train([*args, "--run.dir", str(run)], nproc=1)
    rewind(run, 20)  # 1 process: 32 steps per epoch; died at step 20 of epoch 0
    out = run_train([*args, "--run.dir", str(run)], nproc=2)
    assert "resuming a 1-process checkpoint" in out.stdout + out.stderr
    s = read_summary(run)
    assert s["world_size"] == 2 and s["epochs_completed"] == 2 and s["samples_seen"] == 2 * 1024
    evals = [r for r in read_metrics(run) if r["kind"] == "eval"]
    assert [(r["epoch"], r["count"]) for r in evals] == [(0, 64), (1, 64)]
    # 20 steps of 32 samples, then (1024 - 640) / 64 = 6 steps of epoch 0 and 16 of epoch 1 at 2 x 32.
    assert s["optimizer_steps"] == 20 + 6 + 16
    lrs = [r["lr"] for r in read_metrics(run) if r["kind"] == "train"]
    assert 0 < lrs[-1] < 0.01 * max(lrs), lrs  # fit's cosine schedule ends at the run's real last step, not before or after
