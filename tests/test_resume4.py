"""Resume is bit-exact at 4 ranks, where the order in which ranks' gradients are added matters.

At 2 ranks `a + b == b + a` hides a resumed run that adds in another order; at 4 it does not. Each
way a run is continued (a longer max_steps, a graceful stop, torchrun's restart after a killed
worker) must end at the uninterrupted run's parameters, bit for bit, under DDP and FSDP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from distrib import checkpoint as ck
from tests.helpers import REPO, child_env, read_summary, run_train, wait_for_checkpoints, wait_for_training

pytestmark = pytest.mark.slow

# A constant schedule, so a run continued past its first max_steps has the uninterrupted run's rates.
ARGS = ["--train.batch_size", "16", "--train.grad_accum", "2", "--data.train_size", "4096", "--data.eval_size", "256",
        "--task.dropout", "0.1", "--optim.schedule", "constant", "--train.log_every", "10", "--ckpt.every", "10",
        "--wandb.mode", "disabled"]
STEPS = 40


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def whole(request, tmp_path_factory) -> tuple[list[str], str]:
    args = [*ARGS, "--dist.strategy", request.param]
    run = tmp_path_factory.mktemp(f"whole-{request.param}")
    run_train([*args, "--train.max_steps", str(STEPS), "--run.dir", str(run)], nproc=4)
    return args, read_summary(run)["params_sha256"]


def test_a_longer_max_steps_continues_bit_exact(tmp_path, whole):
    args, expected = whole
    run_train([*args, "--train.max_steps", "20", "--run.dir", str(tmp_path)], nproc=4)
    out = run_train([*args, "--train.max_steps", str(STEPS), "--run.dir", str(tmp_path)], nproc=4)
    assert "resumed from" in out.stdout
    assert read_summary(tmp_path)["params_sha256"] == expected


def _launch(run, args, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", *flags,
           "-m", "distrib.train", *args, "--train.max_steps", str(STEPS), "--run.dir", str(run)]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_a_graceful_stop_and_a_relaunch_is_bit_exact(tmp_path, whole):
    args, expected = whole
    if "fsdp" in args:
        pytest.skip("FSDP's resume is the same load as after a longer max_steps; the DDP stop is the one at risk")
    args = [*args, "--ckpt.every", "100000"]  # the stop's checkpoint is the only one
    proc = _launch(tmp_path, args)
    wait_for_training(tmp_path, proc)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "[rank0] stopped at step" in out, out[-3000:]
    assert not (tmp_path / "summary.json").exists()
    assert len(ck.candidates(tmp_path / "checkpoints")) == 1
    run_train([*args, "--train.max_steps", str(STEPS), "--run.dir", str(tmp_path)], nproc=4)
    assert read_summary(tmp_path)["params_sha256"] == expected


def test_a_restart_after_a_killed_worker_is_bit_exact(tmp_path, whole):
    args, expected = whole
    if "fsdp" in args:
        pytest.skip("one kill per strategy is enough; the DDP run is the one whose reductions change on restart")
    proc = _launch(tmp_path, args, "--max-restarts=1")
    wait_for_checkpoints(tmp_path, 1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 4, workers
    os.kill(int(workers[-1]), signal.SIGKILL)  # one worker dies; torchrun restarts the group
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    assert read_summary(tmp_path)["params_sha256"] == expected
