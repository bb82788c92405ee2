"""Checkpoint storage: atomic writes, manifest last, corrupted/truncated newest -> previous one."""

from __future__ import annotations

import json

# ----------------------------------------------------------------------------- resume end to end
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest

from distrib.checkpoint import store as ck
from distrib.runtime.stop import EXIT_STOPPED  # noqa: E402
from tests.helpers import (  # noqa: E402
    REPO,
    all_gone,
    child_env,
    descendants,
    kill_tree,
    read_metrics,
    read_summary,
    rewind,
    run_train,
    wait_for_checkpoints,
    wait_for_training,
)

RESUME = [
    "--task.dropout",
    "0.1",
    "--train.grad_accum",
    "2",
    "--train.batch_size",
    "16",
    "--train.epochs",
    "2",
    "--data.train_size",
    "16384",
    "--data.eval_size",
    "256",
    "--ckpt.every",
    "37",
    "--train.log_every",
    "50",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("whole")
    run_train([*RESUME, "--run.dir", str(run)], nproc=2)
    return read_summary(run)


def _launch(run_dir, *torchrun_flags: str, extra: list[str] = ()) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *torchrun_flags,
        "-m",
        "distrib.train",
        *RESUME,
        *extra,
        "--run.dir",
        str(run_dir),
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.parametrize("after_checkpoints", [1, 3])
def test_elastic_restart_after_a_worker_is_killed_is_bit_exact(tmp_path, uninterrupted, after_checkpoints):
    run = tmp_path / "elastic"
    proc = _launch(run, "--max-restarts=1")
    wait_for_checkpoints(run, after_checkpoints)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)  # one worker dies; torchrun restarts the group
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out, "the restarted workers did not resume"
    assert read_summary(run)["params_sha256"] == uninterrupted["params_sha256"]


def test_killed_job_with_a_truncated_newest_checkpoint_resumes_from_the_previous_bit_exact(tmp_path, uninterrupted):
    killed = tmp_path / "killed"
    proc = _launch(killed)
    wait_for_checkpoints(killed, 2)
    kill_tree(proc)  # the agent and both workers, mid-run, wherever they are
    assert not (killed / "summary.json").exists(), "the run finished before it was killed: the test proved nothing"
    newest, previous = ck.candidates(killed / "checkpoints")[:2]
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a torn write the manifest must catch
    out = run_train([*RESUME, "--run.dir", str(killed)], nproc=2)
    log = out.stdout + out.stderr
    assert f"checkpoint {newest.name} is not usable" in log and "truncated" in log
    assert f"resumed from {previous}" in log
    whole, resumed = uninterrupted, read_summary(killed)
    assert resumed["params_sha256"] == whole["params_sha256"]
    assert resumed["samples_seen"] == whole["samples_seen"] == 2 * 16384
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert steps == sorted(set(steps))  # lines logged after the checkpoint by the killed run were dropped


# The signal goes to the launcher, which passes it on to each rank's whole process group (torch 2.13
# starts each worker in a session of its own and signals it with killpg), DataLoader workers included.
# SIGTERM with workers is the case that broke: torch's own SIGTERM handler in a worker exits on any sender's SIGTERM.
# SIGHUP is a closed terminal or a dropped ssh session: the launcher passes it on like the others (SIGUSR1
# through torchrun is the Slurm test's warning signal).
@pytest.mark.parametrize("workers, sig, launcher", [(2, signal.SIGTERM, "torchrun"), (0, signal.SIGHUP, "launch/local.sh")])
def test_a_stop_signal_to_the_launcher_checkpoints_at_a_step_and_a_relaunch_is_bit_exact(tmp_path, uninterrupted, workers, sig, launcher):
    run = tmp_path / "stopped"
    # No periodic checkpoints in this run: the only mid-epoch one is the stop's.
    extra = ["--ckpt.every", "100000", "--data.num_workers", str(workers)]
    if launcher == "torchrun":
        proc = _launch(run, extra=extra)
    else:
        cmd = ["bash", str(REPO / launcher), *RESUME, *extra, "--run.dir", str(run)]
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=child_env(PYTHON=sys.executable), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    wait_for_training(run, proc)
    tree = [proc.pid, *descendants(proc.pid)]  # the agent, its ranks, and their DataLoader workers
    assert len(tree) >= 3 + 2 * workers, tree
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    assert not (run / "summary.json").exists(), "the run finished before the signal: the test proved nothing"
    assert "is killed by signal" not in out and "exited unexpectedly" not in out, out[-3000:]  # no DataLoader worker died of it
    stop_step = int(re.search(r"\[rank0\] stopped at step (\d+)/", out).group(1))
    assert stop_step % 50 == 0, "ranks agree at a log interval (train.log_every=50)"
    assert f"{sig.name} received by 2 of 2 ranks" in out
    assert json.loads((run / "stopped.json").read_text()) == {"step": stop_step, "signal": sig.name, "exit_status": EXIT_STOPPED}
    assert [p.name for p in ck.candidates(run / "checkpoints")] == [f"step-{stop_step:09d}"]
    assert f"Exit status {EXIT_STOPPED}" in out
    assert all_gone(tree) == [], "the launcher left processes behind"
    out = run_train([*RESUME, "--run.dir", str(run)], nproc=2)
    assert f"resumed from {ck.step_dir(run / 'checkpoints', stop_step)}" in out.stdout
    assert read_summary(run)["params_sha256"] == uninterrupted["params_sha256"]


def test_an_eval_under_way_gives_way_to_a_stop_and_the_resumed_run_evaluates_again(tmp_path):
    """An eval can outlast torchrun's 30 s grace after a signal: it must yield, not be SIGKILLed without a checkpoint."""
    run, marker = tmp_path / "run", tmp_path / "eval-started"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests/slow_job.py"),
        "--data.train_size",
        "2048",
        "--data.eval_size",
        "64",
        "--train.batch_size",
        "32",
        "--train.eval_batch_size",
        "4",
        "--train.epochs",
        "2",
        "--train.log_every",
        "8",
        "--run.dir",
        str(run),
    ]
    # Each rank's eval is 8 batches of 4 samples at 0.25 s each: 8 s, in which the stop must be taken.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=child_env(SLOW_EVAL_MS="250", EVAL_MARKER=str(marker)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    wait_for_training(run, proc)
    marker.unlink(missing_ok=True)  # the pre-flight probe read an eval batch before training
    while not marker.exists():
        assert proc.poll() is None
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "SIGTERM received during the eval at step 32" in out, out[-3000:]
    assert json.loads((run / "stopped.json").read_text())["step"] == 32  # the end of epoch 0: 2048 / (2 x 32)
    assert not [r for r in read_metrics(run) if r["kind"] == "eval"]  # the interrupted eval logged nothing
    done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "resumed from" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    evals = [(r["step"], r["epoch"], r["count"]) for r in read_metrics(run) if r["kind"] == "eval"]
    assert evals == [(32, 0, 64), (64, 1, 64)]  # epoch 0's eval ran once, after the resume, with every sample
    assert read_summary(run)["epochs_completed"] == 2


INTERACTIVE = [*RESUME, "--data.train_size", "8192", "--train.log_every", "10", "--data.num_workers", "2"]


def test_ctrl_c_with_dataloader_workers_stops_with_a_checkpoint_and_a_second_one_aborts(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group: the rank and its workers."""
    run_train([*INTERACTIVE, "--run.dir", str(tmp_path / "whole")], nproc=1)
    run = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "distrib.train", *INTERACTIVE, "--run.dir", str(run)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_training(run, proc)
    tree = [proc.pid, *descendants(proc.pid)]
    assert len(tree) >= 3, tree  # the rank and 2 workers (and the wandb process)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, out[-3000:]
    assert "Ctrl-C: stopping at the next log interval" in out and "SIGINT received by 1 of 1 ranks" in out
    assert "KeyboardInterrupt" not in out and "is killed by signal" not in out
    assert json.loads((run / "stopped.json").read_text())["signal"] == "SIGINT"
    assert all_gone(tree) == []
    out = run_train([*INTERACTIVE, "--run.dir", str(run)], nproc=1)
    assert "resumed from" in out.stdout
    assert read_summary(run)["params_sha256"] == read_summary(tmp_path / "whole")["params_sha256"]
    # Ctrl-C twice, a human's second apart: the run aborts at once, without its stop checkpoint.
    aborted = tmp_path / "aborted"
    cmd = [sys.executable, "-m", "distrib.train", *INTERACTIVE, "--train.log_every", "100000", "--data.train_size", "65536", "--run.dir", str(aborted)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while not (aborted / "config.json").exists():
        assert proc.poll() is None
        time.sleep(0.02)
    tree = [proc.pid, *descendants(proc.pid)]
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in out, out[-3000:]
    assert not (aborted / "stopped.json").exists() and not (aborted / "summary.json").exists()
    assert all_gone(tree) == []


def test_sigterm_and_sigusr1_exit_with_the_documented_status(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        run = tmp_path / sig.name
        cmd = [sys.executable, "-m", "distrib.train", *RESUME, "--train.epochs", "50", "--run.dir", str(run)]
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while not (run / "metrics.jsonl").exists() or '"train"' not in (run / "metrics.jsonl").read_text():
            time.sleep(0.02)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == EXIT_STOPPED, out[-2000:]
        assert f"{sig.name} received by 1 of 1 ranks" in out
        assert json.loads((run / "stopped.json").read_text())["signal"] == sig.name


def test_resume_with_dataloader_workers_is_bit_exact(tmp_path):
    """Workers are seeded per (seed, rank, epoch, skip), so a mid-epoch resume draws the same dropout and order."""
    args = [*RESUME, "--data.train_size", "1024", "--data.num_workers", "2", "--ckpt.every", "5", "--ckpt.keep", "100"]
    run_train([*args, "--run.dir", str(tmp_path / "whole")], nproc=1)
    whole = read_summary(tmp_path / "whole")
    run = tmp_path / "cut"
    run_train([*args, "--run.dir", str(run)], nproc=1)
    # Pretend the job died after step 15 (mid-epoch 0, 32 steps per epoch), mid-way through an accumulation.
    rewind(run, 15)
    out = run_train([*args, "--run.dir", str(run)], nproc=1)
    assert "resumed from" in out.stdout and "step 15 (epoch 0" in out.stdout
    assert read_summary(run)["params_sha256"] == whole["params_sha256"]


def test_a_resume_that_changes_the_global_batch_is_refused_with_strict_and_warned_of_without(tmp_path):
    args = [*RESUME, "--data.train_size", "2048", "--ckpt.every", "10", "--run.dir", str(tmp_path / "run")]
    run_train(args, nproc=2)  # 16 x 2 micro-batches x 2 processes: 64 a step, 32 steps an epoch
    ckpts = tmp_path / "run" / "checkpoints"
    for later in ("step-000000060", "step-000000064"):
        shutil.rmtree(ckpts / later)
    files = lambda: sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file())  # noqa: E731
    before = files()
    # One process with the same batch_size and grad_accum: a global batch of 32, another trajectory.
    out = run_train([*args, "--ckpt.elastic", "strict"], nproc=1, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "the global batch changes from 64 to 32 samples per optimizer step" in out.stderr and "ckpt.elastic=strict" in out.stderr
    assert "--train.global_batch_size 64" in out.stderr
    assert files() == before  # nothing written
    out = run_train(args, nproc=1)
    assert "the global batch changes from 64 to 32" in out.stdout + out.stderr and "will not end where the uninterrupted run would" in out.stdout + out.stderr
    s = read_summary(tmp_path / "run")
    # Resumed at step 50 (1152 of epoch 1's 2048 samples); the other 896 take 28 steps of 32.
    assert s["world_size"] == 1 and s["samples_seen"] == 2 * 2048 and s["optimizer_steps"] == 50 + 28
    assert [(b["step"], b["world_size"], b["micro_batch"], b["grad_accum"]) for b in s["batch_splits"]] == [(0, 2, 16, 2), (50, 1, 16, 2)]


def test_resume_never_starts_fresh(tmp_path):
    args = [*RESUME, "--data.train_size", "256", "--train.epochs", "1", "--run.dir", str(tmp_path / "run")]
    run_train(args, nproc=1)
    out = run_train([*args, "--ckpt.resume", "never"], nproc=1)
    assert "resumed" not in out.stdout and read_summary(tmp_path / "run")["optimizer_steps"] == 8


_LATE_SIGNAL = """
import os, signal, sys, threading, time
import torch
import distrib
from distrib.cli.task import TaskConfig, make_datasets, make_model

class LateSignal(distrib.Callback):
    # The run is over: rank 0 lingers 3 s, so rank 1 waits in the final barrier when, 1 s in, it takes a SIGTERM.
    def on_fit_end(self, trainer, summary):
        if trainer.session.rank == 1:
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        else:
            time.sleep(3)

torch.set_num_threads(1)
train, _ = make_datasets(TaskConfig(), train_size=256, eval_size=64, seed=0)
model = make_model(TaskConfig(), seed=0)
cfg = distrib.Config().replace(**{"run.dir": sys.argv[1], "wandb.mode": "disabled", "train.epochs": 1, "train.batch_size": 32})
distrib.fit(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data=train, callbacks=[LateSignal()])
"""


def test_a_signal_after_the_last_step_does_not_kill_a_rank_in_the_final_barrier(tmp_path):
    # The stop handlers stay until the process group is gone (distrib.stop.SignalRoute). Before, a
    # SIGTERM in that window killed rank 1 under rank 0's barrier: torchrun failed the finished job.
    script = tmp_path / "late_signal.py"
    script.write_text(_LATE_SIGNAL)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_summary(tmp_path / "run")["optimizer_steps"] == 4
    assert "Traceback" not in proc.stderr
