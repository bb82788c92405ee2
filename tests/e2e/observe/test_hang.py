"""The hang watchdog on real hangs (gloo ranks under torchrun): the verdict names the rank holding the
others up and its frame, the job ends with exit 1 long before dist.timeout_s, every rank's stacks are
kept in run.dir/hang-<time>/ with the last checkpoint, and a clean run with slow phases raises nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from distrib.checkpoint.store import newest_good
from tests.e2e.observe.test_monitor import slow_job
from tests.helpers import REPO, child_env

FOREVER = "100000"  # seconds: a sleep no run outlasts


def _verdict(done: subprocess.CompletedProcess) -> str:
    text = done.stdout + done.stderr
    found = re.search(r"^distrib: error: no rank made progress.*?(?=^distrib: error: rank|\Z)", text, re.S | re.M)
    assert found, text[-4000:]
    return found.group(0)


def _hang_dir(run: Path) -> Path:
    found = sorted(run.glob("hang-*"))
    assert len(found) == 1, found
    return found[0]


def test_a_rank_asleep_in_getitem_is_named_and_the_job_ends_with_its_last_checkpoint(tmp_path):
    # The check: hang_timeout_s 10, rank 1 asleep for good in __getitem__ (after the step-4 checkpoint).
    start = time.monotonic()
    done = slow_job(
        tmp_path, "--train.hang_timeout_s", "10", "--dist.timeout_s", "300", "--ckpt.every", "2", SLOW_RANK="1", SLOW_MS="0", SLEEP_AT="300", SLEEP_S=FOREVER
    )
    took = time.monotonic() - start
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert took < 10 + 15 + 20, took  # timeout + 15 s, plus the job's start; dist.timeout_s (300 s) never came into it
    verdict = _verdict(done)
    assert "rank 1 is behind: rank 0 went further (backward of step" in verdict, verdict
    assert "Rank 1 is in slow_job.py:" in verdict and "__getitem__, fetching a batch of step" in verdict, verdict
    hang = _hang_dir(tmp_path / "run")
    assert f"Every rank's stacks are in {hang}/" in verdict
    assert (hang / "verdict.txt").read_text().splitlines()[0] in verdict
    stacks = {r: (hang / f"rank-{r:05d}.txt").read_text() for r in (0, 1)}
    assert "in __getitem__" in stacks[1] and "in __getitem__" not in stacks[0]
    assert "Thread 'MainThread'" in stacks[0] and "distrib-watchdog" not in stacks[0]
    # The job ended with its last checkpoint intact: the one the message names, whole and finite.
    newest = newest_good(tmp_path / "run" / "checkpoints")
    assert newest is not None and newest[0].name == "step-000000002"  # rank 1 fell asleep fetching step 4's batch
    assert f"The last good checkpoint is {newest[0]}: run the same command again to resume from it." in verdict, verdict
    state = torch.load(newest[0] / "state.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["objects"]["model"].values())


def test_a_dataloader_worker_asleep_is_named_with_its_stack_and_does_not_outlive_the_job(tmp_path):
    done = slow_job(tmp_path, "--train.hang_timeout_s", "3", "--data.num_workers", "2", SLOW_RANK="1", SLOW_MS="0", SLEEP_AT="100", SLEEP_S=FOREVER)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    verdict = _verdict(done)
    found = re.search(r"Rank 1 is in slow_job\.py:\d+ __getitem__ \(DataLoader worker pid (\d+)\)", verdict)
    assert found, verdict
    stacks = (_hang_dir(tmp_path / "run") / "rank-00001.txt").read_text()
    assert f"DataLoader worker pid {found.group(1)} (faulthandler, most recent call first):" in stacks
    time.sleep(0.5)
    assert not Path(f"/proc/{found.group(1)}").exists(), "the sleeping worker outlived its rank"


def test_a_rank_that_skips_a_collective_is_named_at_4_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(REPO / "tests/hang_job.py")]
    cmd += ["--run.dir", str(tmp_path / "run"), "--train.hang_timeout_s", "5", "--wandb.mode", "disabled"]
    done = subprocess.run(cmd, cwd=REPO, env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    verdict = _verdict(done)
    head = verdict.removeprefix("distrib: error: no rank made progress for train.hang_timeout_s=5 s: ")
    assert re.match(r"rank 1 skipped all_reduce #1 \(shapes 1; hang_job\.py:\d+ own_loop\), which ranks 0, 2, 3 are waiting in", head), head
    assert re.search(r"Rank 1 is in hang_job\.py:\d+ own_loop, in barrier \(end of the run\) #1", head), head
    assert (tmp_path / "run" / "metrics.jsonl").exists() is False  # the run wrote nothing of its own but the verdict
    assert sorted(p.name for p in _hang_dir(tmp_path / "run").iterdir()) == [
        "rank-00000.txt",
        "rank-00001.txt",
        "rank-00002.txt",
        "rank-00003.txt",
        "verdict.txt",
    ]


def test_a_clean_run_with_slow_evals_and_checkpoints_raises_no_verdict(tmp_path):
    # 200 steps, then an eval of ~6 s, more than hang_timeout_s, in batches of ~2 s; checkpoints every 50 steps.
    args = ["--data.train_size", "25600", "--data.eval_size", "384", "--train.epochs", "1", "--train.log_every", "20", "--ckpt.every", "50"]
    done = slow_job(tmp_path, *args, "--train.hang_timeout_s", "4", SLOW_EVAL_MS="30", EVAL_MARKER=str(tmp_path / "eval-started"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stdout + done.stderr
    assert "[watchdog]" not in text and not list((tmp_path / "run").glob("hang-*")), text[-3000:]
    assert (tmp_path / "eval-started").exists() and "step 200" in text
    assert os.path.exists(tmp_path / "run" / "summary.json")
