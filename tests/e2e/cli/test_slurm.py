"""The sbatch files, requeue after a signal, `distrib slurm submit` and `distrib doctor`, on a real
Slurm cluster (scripts/slurm-cluster.sh starts one: two slurmd daemons on this machine).

Without a reachable cluster these tests skip, except under DISTRIB_REQUIRE_SLURM=1 (CI), where
that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distrib.runtime.stop import STOPPED_FILE
from tests.helpers import REPO, child_env, read_summary, run_train

pytestmark = pytest.mark.slurm

SHORT = ["--data.train_size", "4096", "--data.eval_size", "256", "--train.epochs", "1", "--task.dropout", "0.1"]
# 1920 steps in 15 epochs (fewer epoch ends: each evaluates and checkpoints)
LONG = ["--data.train_size", "16384", "--data.eval_size", "256", "--train.epochs", "15", "--train.log_every", "8", "--task.dropout", "0.1"]


def _cluster_problem() -> str | None:
    if not shutil.which("sbatch"):
        return "sbatch is not installed (bash scripts/slurm-cluster.sh start sets up a test cluster)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mixed,alloc", "-o", "%N"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    nodes = set(out.stdout.split())
    if out.returncode != 0 or len(nodes) < 2:
        return f"no Slurm cluster with 2 usable nodes ({out.stderr.strip() or sorted(nodes)}); run: bash scripts/slurm-cluster.sh start"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = _cluster_problem()
    if problem:
        if os.environ.get("DISTRIB_REQUIRE_SLURM") == "1":
            pytest.fail(f"DISTRIB_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


def _env() -> dict[str, str]:
    # sbatch exports the submitter's environment: the job finds this interpreter and distrib through it.
    return child_env(PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def _sbatch(cwd: Path, *args: str, wait: bool = True) -> tuple[str, subprocess.CompletedProcess]:
    """Submit; with `wait`, poll until the job ends (sbatch --wait polls at growing intervals, up to 30 s)."""
    done = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=60)
    job = done.stdout.strip().split(";")[0]
    if wait and done.returncode == 0:
        state = _wait_state(job, ENDED)
        done.returncode = 0 if state == "COMPLETED" and _job_field(job, "ExitCode") == "0:0" else 1
    return job, done


def _job_log(cwd: Path, job: str) -> str:
    return "".join(p.read_text() for p in cwd.glob(f"slurm-*-{job}.out"))


def _job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


def _wait_state(job: str, done: tuple[str, ...], timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while (state := _job_field(job, "JobState")) not in done:
        assert time.monotonic() < deadline, f"job {job} still {state}"
        time.sleep(0.5)
    return state


@pytest.fixture(scope="module")
def local_short(tmp_path_factory) -> str:
    """The equivalent local torchrun run (2 processes) of SHORT."""
    run = tmp_path_factory.mktemp("local-short")
    run_train([*SHORT, "--run.dir", str(run)], nproc=2)
    return read_summary(run)["params_sha256"]


def test_train_sbatch_on_two_nodes_matches_local_torchrun(cluster, tmp_path, local_short):
    job, done = _sbatch(tmp_path, "--nodes=2", str(REPO / "slurm/train.sbatch"), *SHORT)
    assert done.returncode == 0, _job_log(tmp_path, job) + done.stderr
    summary = read_summary(tmp_path / "runs" / f"slurm-{job}")  # the run dir is derived from the job id
    assert summary["world_size"] == 2 and summary["launcher"] == "torchrun"
    assert summary["params_sha256"] == local_short


def test_srun_sbatch_with_two_tasks_and_no_torchrun_matches(cluster, tmp_path, local_short):
    job, done = _sbatch(tmp_path, "--ntasks=2", str(REPO / "slurm/srun.sbatch"), *SHORT, "--run.dir", str(tmp_path / "mine"))
    assert done.returncode == 0, _job_log(tmp_path, job) + done.stderr
    summary = read_summary(tmp_path / "mine")  # --run.dir given: used as it is
    assert summary["world_size"] == 2 and summary["launcher"] == "slurm"
    assert summary["params_sha256"] == local_short


def test_your_own_loop_runs_under_srun_and_ends_at_fits_parameters(cluster, tmp_path):
    """examples/own_loop.py (the user's loop on distrib's blocks) as srun tasks, against fit under torchrun."""
    args = ["--wandb.mode", "disabled", "--train.epochs", "2", "--train.grad_accum", "2"]
    local = tmp_path / "fit"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "examples/digits.py"), *args, "--run.dir", str(local)],
        cwd=REPO,
        env=child_env(),
        check=True,
        capture_output=True,
        timeout=240,
    )
    command = " ".join([sys.executable, str(REPO / "examples/own_loop.py"), *args, "--run.dir", str(tmp_path / "own")])
    job, done = _sbatch(tmp_path, "--ntasks=2", f"--wrap=srun {command}")
    assert done.returncode == 0, _job_log(tmp_path, job) + done.stderr
    summary = read_summary(tmp_path / "own")
    assert summary["world_size"] == 2 and summary["params_sha256"] == read_summary(local)["params_sha256"]


def test_submit_dry_run_prints_a_script_sbatch_runs_as_it_is(cluster, tmp_path, local_short):
    out = subprocess.run(
        [sys.executable, "-m", "distrib.cli", "slurm", "submit", "--nodes", "2", "--time", "00:10:00", "--dry-run", "--", *SHORT],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "#SBATCH --nodes=2" in out and "#SBATCH --time=00:10:00" in out and "--train.epochs 1" in out
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    job, done = _sbatch(tmp_path, str(script))  # no arguments: everything is in the script
    assert done.returncode == 0, _job_log(tmp_path, job) + done.stderr
    assert _job_field(job, "NumNodes") == "2" and _job_field(job, "TimeLimit") == "00:10:00"
    assert read_summary(tmp_path / "runs" / f"slurm-{job}")["params_sha256"] == local_short


def test_submit_prints_the_job_id_and_the_job_completes(cluster, tmp_path, local_short):
    out = subprocess.run(
        [sys.executable, "-m", "distrib.cli", "slurm", "submit", "--nodes", "2", "--", *SHORT],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    job = out.strip()
    assert job.isdigit(), out
    assert _wait_state(job, ENDED) == "COMPLETED", _job_log(tmp_path, job)
    assert read_summary(tmp_path / "runs" / f"slurm-{job}")["params_sha256"] == local_short


def _start_requeued_now(job: str) -> None:
    """Lift the hold Slurm puts on a requeued job (Reason=BeginTime), safely.

    slurmd revokes the old instance's credential and rejects a new one created in the same second
    or earlier ("Killing non-startable batch job: Job credential revoked"): Slurm's hold exists
    for that. So wait until no node is still completing the old instance, and for the clock to
    pass the revocation's second, before starting it.
    """
    deadline = time.monotonic() + 60
    while subprocess.run(["sinfo", "-h", "-t", "completing", "-o", "%N"], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "nodes still completing the job's first instance"
        time.sleep(0.2)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)


@pytest.fixture(scope="module")
def local_long(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("local-long")
    run_train([*LONG, "--run.dir", str(run)], nproc=2)
    return read_summary(run)


def _trained_past(run: Path, step: int) -> bool:
    """A train record past `step` in the run's metrics: the job (re)started and is training.

    Not read_metrics(): the job is still writing, so only lines already ended by a newline are whole.
    """
    path = run / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return any(r["kind"] == "train" and r["step"] > step for r in map(json.loads, lines))


# One job is signalled twice, each stop checkpointing and requeueing it:
# - first USR1 to everything, batch shell included (scancel --full): the sbatch file's warning signal, or a user's;
# - then, once the requeued job trains again, TERM to the job's steps: what a preemption sends. (srun itself
#   answers a SIGTERM by killing the step, so a TERM to the batch shell too, scancel --full --signal=TERM,
#   cannot be graceful.)
# One job for both keeps CI a minute shorter and covers a second requeue of the same job.
# The first instance loads data with no DataLoader workers, the second with 2 per rank, which the TERM to
# the job's steps reaches too (they must not die of it): the config file the job reads is rewritten in between.
def test_signals_checkpoint_requeue_resume_twice_and_match_the_uninterrupted_run(cluster, tmp_path, local_long):
    config = tmp_path / "workers.toml"
    config.write_text("[data]\nnum_workers = 0\n")
    job, done = _sbatch(tmp_path, "--nodes=2", str(REPO / "slurm/train.sbatch"), *LONG, "--config", str(config), wait=False)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / f"slurm-{job}"
    past = 0
    for restarts, (sig, scancel) in enumerate([("USR1", ["--full"]), ("TERM", [])], start=1):
        deadline = time.monotonic() + 120
        while not _trained_past(run, past):
            assert time.monotonic() < deadline, _job_log(tmp_path, job)
            time.sleep(0.1)
        subprocess.run(["scancel", *scancel, f"--signal={sig}", job], check=True)
        # The job stops at a step boundary with a checkpoint and requeues itself; Slurm holds a
        # requeued job for a while (Reason=BeginTime): start it now.
        deadline = time.monotonic() + 120
        while _job_field(job, "Restarts") != str(restarts):
            assert time.monotonic() < deadline, f"{sig}: " + _job_log(tmp_path, job)
            time.sleep(0.2)
        stopped = json.loads((run / STOPPED_FILE).read_text())
        assert stopped["signal"] == f"SIG{sig}" and stopped["step"] % 8 == 0 and stopped["step"] > past, stopped
        assert (run / "checkpoints" / f"step-{stopped['step']:09d}").is_dir()
        config.write_text("[data]\nnum_workers = 2\n")
        assert _wait_state(job, ("PENDING", "RUNNING", "COMPLETED")) in ("PENDING", "RUNNING", "COMPLETED")
        _start_requeued_now(job)
        past = stopped["step"]
    assert _wait_state(job, ENDED) == "COMPLETED", _job_log(tmp_path, job)
    log = _job_log(tmp_path, job)
    assert "requeue 1 of at most" in log and "requeue 2 of at most" in log, log
    assert f"resumed from {run.relative_to(tmp_path)}/checkpoints/step-{past:09d}" in log, log
    assert not (run / STOPPED_FILE).exists()
    assert "is killed by signal" not in log and "exited unexpectedly" not in log
    assert "resuming with a changed config: data.num_workers 0 -> 2 (applied)" in log
    assert read_summary(run)["params_sha256"] == local_long["params_sha256"]
    assert read_summary(run)["optimizer_steps"] == 15 * 128


ELASTIC = ["--data.train_size", "4096", "--data.eval_size", "256", "--train.epochs", "4", "--train.log_every", "8"]
ELASTIC += ["--train.global_batch_size", "64", "--train.batch_size", "32"]


def test_a_job_resubmitted_on_fewer_nodes_continues_the_trajectory(cluster, tmp_path):
    # With a global batch, a stopped job that comes back on 1 node instead of 2 trains the same samples in every
    # step: it ends within float tolerance of the uninterrupted 2-process run (docs/elastic.md).
    local, run = tmp_path / "local", tmp_path / "run"
    run_train([*ELASTIC, "--run.dir", str(local)], nproc=2)
    job, done = _sbatch(tmp_path, "--nodes=2", str(REPO / "slurm/train.sbatch"), *ELASTIC, "--run.dir", str(run), wait=False)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 120
    while not _trained_past(run, 0):
        assert time.monotonic() < deadline, _job_log(tmp_path, job)
        time.sleep(0.1)
    subprocess.run(["scancel", "--full", "--signal=USR1", job], check=True)
    deadline = time.monotonic() + 120
    while _job_field(job, "Restarts") != "1":  # stopped with a checkpoint, and requeued
        assert time.monotonic() < deadline, _job_log(tmp_path, job)
        time.sleep(0.2)
    # Only one node to be had now: the requeued job is cancelled and the same command resubmitted on 1 node.
    subprocess.run(["scancel", job], check=True)
    _wait_state(job, ENDED)
    smaller, done = _sbatch(tmp_path, "--nodes=1", str(REPO / "slurm/train.sbatch"), *ELASTIC, "--run.dir", str(run))
    log = _job_log(tmp_path, smaller)
    assert done.returncode == 0, log + done.stderr
    assert "on 1 process with the same global batch of 64" in log, log
    s, whole = read_summary(run), read_summary(local)
    assert s["world_size"] == 1 and [b["world_size"] for b in s["batch_splits"]] == [2, 1]
    assert (s["optimizer_steps"], s["samples_seen"]) == (whole["optimizer_steps"], whole["samples_seen"])
    a, b = torch.load(run / "model.pt", weights_only=True), torch.load(local / "model.pt", weights_only=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_doctor_flags_torchrun_inside_srun_with_a_task_per_gpu(cluster, tmp_path):
    done = subprocess.run(
        [
            "srun",
            "--nodes=1",
            "--ntasks-per-node=2",
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "distrib.doctor",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.count("a double launch") == 2, done.stdout + done.stderr
    done = subprocess.run(
        ["srun", "--nodes=2", "--ntasks-per-node=1", sys.executable, "-m", "distrib.doctor"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.count("no problems found") == 2, done.stdout + done.stderr
    assert "[rank1] launcher  slurm" in done.stdout and "2 node(s) n[1-2]" in done.stdout
