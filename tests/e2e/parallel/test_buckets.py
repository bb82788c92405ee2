"""Resume is bit-exact at 4 ranks, where the order in which ranks' gradients are added matters.

At 2 ranks `a + b == b + a` hides a resumed run that adds in another order; at 4 it does not. Each
way a run is continued (a longer max_steps, a graceful stop, torchrun's restart after a killed
worker) must end at the uninterrupted run's parameters, bit for bit. The DDP run goes through all
three in one chain of launches (each is a resume, and any one that adds in another order changes
the final hash); FSDP, whose reductions do not change on a resume, is checked on the first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from distrib.checkpoint import store as ck
from tests.helpers import REPO, child_env, read_summary, run_train

pytestmark = pytest.mark.slow

# A constant schedule, so a run continued past its first max_steps has the uninterrupted run's rates.
ARGS = [
    "--train.batch_size",
    "16",
    "--train.grad_accum",
    "2",
    "--data.train_size",
    "4096",
    "--data.eval_size",
    "256",
    "--task.dropout",
    "0.1",
    "--optim.schedule",
    "constant",
    "--train.log_every",
    "5",
    "--ckpt.every",
    "10",
    "--wandb.mode",
    "disabled",
]
STEPS = 60


def _whole(run, args) -> str:
    run_train([*args, "--train.max_steps", str(STEPS), "--run.dir", str(run)], nproc=4)
    return read_summary(run)["params_sha256"]


def _wait_past(run, step: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not any(int(p.name.split("-")[1]) > step for p in ck.candidates(run / "checkpoints")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.02)


def _launch(run, args, *flags: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        *flags,
        "-m",
        "distrib.train",
        *args,
        "--train.max_steps",
        str(STEPS),
        "--run.dir",
        str(run),
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_ddp_continued_by_max_steps_a_graceful_stop_and_a_restart_is_bit_exact(tmp_path):
    args = [*ARGS, "--dist.strategy", "ddp"]
    expected = _whole(tmp_path / "whole", args)
    run = tmp_path / "run"
    # 1. A shorter run, then the same command with more steps.
    run_train([*args, "--train.max_steps", "20", "--run.dir", str(run)], nproc=4)
    # 2. That continuation stopped by SIGTERM to torchrun (every rank stops at one step, checkpointed).
    proc = _launch(run, args)
    _wait_past(run, 20, proc)  # a checkpoint of this launch's own: it trains
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "resumed from" in out and "[rank0] stopped at step" in out, out[-3000:]
    assert read_summary(run)["optimizer_steps"] == 20  # the first launch's: the stopped one wrote none
    # 3. The relaunch, under --max-restarts, loses a worker to SIGKILL after its first checkpoint; the restarted group resumes.
    stopped_at = int(ck.candidates(run / "checkpoints")[0].name.split("-")[1])
    proc = _launch(run, args, "--max-restarts=1")
    _wait_past(run, stopped_at, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 4, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("resumed from") >= 2, "the restarted group did not resume"
    assert read_summary(run)["params_sha256"] == expected


def test_fsdp_continued_by_max_steps_is_bit_exact(tmp_path):
    args = [*ARGS, "--dist.strategy", "fsdp"]
    expected = _whole(tmp_path / "whole", args)
    run = tmp_path / "run"
    run_train([*args, "--train.max_steps", "20", "--run.dir", str(run)], nproc=4)
    out = run_train([*args, "--train.max_steps", str(STEPS), "--run.dir", str(run)], nproc=4)
    assert "resumed from" in out.stdout
    assert read_summary(run)["params_sha256"] == expected
