"""The logic behind the sbatch files and `distrib doctor`, from environment dicts (no cluster needed)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from distrib.cli import slurm
from distrib.cli.doctor import _port_in_use
from distrib.runtime.stop import EXIT_STOPPED, STOPPED_FILE
from tests.helpers import REPO, child_env, free_port, read_summary, run_train


def _stopped(tmp_path, exit_status=EXIT_STOPPED):
    (tmp_path / STOPPED_FILE).write_text(json.dumps({"step": 8, "signal": "SIGUSR1", "exit_status": exit_status}))


def test_epilogue_requeues_only_after_a_stop_and_at_most_the_cap(tmp_path, capfd):
    assert slurm.epilogue(str(tmp_path), 1, {"SLURM_JOB_ID": "7"}, requeue=("false",)) == 1  # a failure is not requeued
    _stopped(tmp_path)
    # torchrun reports its workers' 75 as 1: the fresh stopped.json is the proof
    assert slurm.epilogue(str(tmp_path), 1, {"SLURM_JOB_ID": "7", "DISTRIB_STOP_MARK": "none"}, requeue=("true",)) == 0
    assert "requeueing job 7 (requeue 1 of at most 20)" in capfd.readouterr().out
    env = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "3", "DISTRIB_MAX_REQUEUES": "3", "DISTRIB_STOP_MARK": "none"}
    assert slurm.epilogue(str(tmp_path), 1, env, requeue=("false",)) == EXIT_STOPPED
    assert "already requeued 3 times (DISTRIB_MAX_REQUEUES=3): not requeueing" in capfd.readouterr().out


@pytest.mark.parametrize(
    "case, status, expected",
    [
        ("an earlier step's stopped.json, this step failed", 1, 1),  # peers never met, a refused resume, OOM
        ("an earlier step's stopped.json, this step finished", 0, 0),
        ("a fresh stopped.json of a failure", 1, 1),  # not exit_status 75: not a graceful stop
        ("no mark from the prologue, status 1", 1, 1),  # an old sbatch file: only 75 itself counts
        ("no mark from the prologue, status 75", EXIT_STOPPED, 0),
    ],
)
def test_epilogue_requeues_only_a_graceful_stop_of_this_very_step(tmp_path, capfd, case, status, expected):
    _stopped(tmp_path, exit_status=1 if "of a failure" in case else EXIT_STOPPED)
    env = {"SLURM_JOB_ID": "7"}
    if "earlier" in case:
        env["DISTRIB_STOP_MARK"] = slurm.stop_mark(str(tmp_path))  # the prologue saw this very file
    elif "fresh" in case:
        env["DISTRIB_STOP_MARK"] = "none"
    assert slurm.epilogue(str(tmp_path), status, env, requeue=("true",)) == expected
    out = capfd.readouterr().out
    assert ("requeueing job 7" in out) == (expected == 0 and status != 0)
    if expected:
        assert "without a graceful stop; not requeueing" in out


def test_doctor_flags_a_port_in_use_for_real():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert _port_in_use("127.0.0.1", port)
        out = subprocess.run([sys.executable, "-m", "distrib.cli", "doctor"], env=child_env(MASTER_PORT=str(port)), capture_output=True, text=True)
    assert out.returncode == 1 and f"MASTER_PORT={port} is already in use" in out.stdout and "fix: export MASTER_PORT=" in out.stdout
    assert not _port_in_use("127.0.0.1", free_port())


def test_two_torchrun_agents_with_c10d_rendezvous_train_together_without_slurm(tmp_path):
    args = ["--data.train_size", "4096", "--data.eval_size", "256", "--train.epochs", "1", "--task.dropout", "0.1"]
    port = str(free_port())
    agents = [
        subprocess.Popen(
            ["bash", str(REPO / "launch/multinode.sh"), *args, "--run.dir", str(tmp_path / "two-agents")],
            cwd=REPO,
            env=child_env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RDZV_ID="t", PYTHON=sys.executable),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [a.communicate(timeout=180)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    run_train([*args, "--run.dir", str(tmp_path / "one-agent")], nproc=2)
    two, one = read_summary(tmp_path / "two-agents"), read_summary(tmp_path / "one-agent")
    assert two["world_size"] == 2 and two["params_sha256"] == one["params_sha256"]
