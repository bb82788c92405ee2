"""The edges a hurried user finds: planted links, special files, full disks, damaged and old checkpoints.

One table per kind of edge. Each row runs the real command (the CLI's `main` in this process where
no process group is involved) on a scratch directory and checks the exit status, the message and
what is on disk afterwards: a link's target untouched, a device still a device, the last good
checkpoint named.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrib import Callback, fit
from distrib import main as distrib_main
from distrib.checkpoint import store as ck
from distrib.cli.train import main
from distrib.runtime.stop import LAUNCHER_SIGNALS
from tests.helpers import REPO, child_env

SMALL = ["--data.train_size", "256", "--data.eval_size", "64", "--train.batch_size", "32", "--train.epochs", "1", "--wandb.mode", "disabled"]


# ----------------------------------------------------------------------------- links distrib did not make


# ----------------------------------------------------------------------------- special files


# ----------------------------------------------------------------------------- checkpoints: damaged, old, newer


# ----------------------------------------------------------------------------- I/O errors mid-run


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (root only): writes past it fail with ENOSPC, as on a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    for _ in range(3):  # a test may have bound a read-only mount over it
        if subprocess.run(["umount", "-l", str(mount)], capture_output=True).returncode != 0:
            break


def test_a_full_disk_mid_run_is_an_error_naming_space_and_the_last_good_checkpoint(small_disk, capsys):
    run = small_disk / "run"
    # ~100 KB per checkpoint of this model: the first ones fit, a later one does not.
    args = [*SMALL, "--task.hidden", "128", "--train.epochs", "40", "--ckpt.every", "4", "--ckpt.keep", "100", "--run.dir", str(run)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("distrib: error: the disk is full writing ") and "No space left on device" in err, err
    assert "MiB free" in err and "needed about" in err and "HINT: free space" in err
    good = ck.newest_good(run / "checkpoints")
    assert good is not None and f"The last good checkpoint is {good[0]}" in err
    assert "Traceback" not in err


class _ReadOnlyAfterFirstCheckpoint(Callback):
    """After the first checkpoint, remount the run's file system read-only: a disk that goes bad under a run."""

    def __init__(self, mount: Path) -> None:
        self.mount, self.done = mount, False

    def on_checkpoint(self, trainer, step):
        if not self.done:
            self.done = True
            trainer.session.wait_for_save()
            # A read-only bind mount over it: a plain remount is refused while metrics.jsonl is open for writing.
            subprocess.run(["mount", "--bind", str(self.mount), str(self.mount)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(self.mount)], check=True)


def test_a_run_dir_gone_read_only_mid_run_is_an_error_not_a_traceback(small_disk, capsys):
    from distrib.cli.task import SECTIONS, make_datasets, make_model

    def train(cfg):
        train_data, _ = make_datasets(cfg.task, train_size=cfg.data.train_size, eval_size=cfg.data.eval_size, seed=cfg.seed)
        return fit(cfg, model=make_model(cfg.task, seed=cfg.seed), train_data=train_data, callbacks=[_ReadOnlyAfterFirstCheckpoint(small_disk)])

    run = small_disk / "run"
    code = distrib_main(train, sections=SECTIONS, argv=[*SMALL, "--train.max_steps", "6", "--ckpt.every", "2", "--run.dir", str(run)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("distrib: error: cannot write ") and "Read-only file system" in err, err
    assert f"The last good checkpoint is {run / 'checkpoints' / 'step-000000002'}" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- signals


LONG = [*SMALL, "--data.train_size", "65536", "--train.epochs", "2", "--train.log_every", "20", "--ckpt.every", "100000"]


def _torchrun(run: Path, *args: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--signals-to-handle={LAUNCHER_SIGNALS}",
        "-m",
        "distrib.train",
        *args,
        "--run.dir",
        str(run),
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_a_second_ctrl_c_under_torchrun_aborts(tmp_path):
    run = tmp_path / "run"
    proc = _torchrun(run, *LONG, "--train.log_every", "100000")  # the first press waits for a log interval that never comes
    wait_for_config = time.monotonic() + 60
    while not (run / "config.json").exists():
        assert proc.poll() is None and time.monotonic() < wait_for_config
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the agent, which forwards it
    time.sleep(1.5)
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)  # the agent passes the second press on as SIGTERM
    out, _ = proc.communicate(timeout=120)
    assert time.monotonic() - started < 20, "the ranks waited for torchrun's SIGKILL instead of aborting"
    assert "KeyboardInterrupt" in out and "Ctrl-C: stopping at the next log interval" in out, out[-3000:]
    assert not (run / "stopped.json").exists() and not (run / "summary.json").exists()


# ----------------------------------------------------------------------------- reruns and --debug


# ----------------------------------------------------------------------------- every command answers --help


@pytest.mark.parametrize(
    "script, says",
    [
        ("launch/local.sh", "Train on this machine"),
        ("launch/debug.sh", "Single-process debugging"),
        ("launch/multinode.sh", "Multi-node without a scheduler"),
        ("scripts/setup.sh", "Create .venv"),
        ("scripts/test.sh", "run the test suite"),
        ("scripts/slurm-cluster.sh", "two-node Slurm"),
        ("scripts/lint.sh", "Lint, format check and type check"),
    ],
)
def test_every_script_answers_help_without_doing_its_work(script, says):
    done = subprocess.run(["bash", script, "--help"], cwd=REPO, env=child_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and says in done.stdout, done.stdout[-1000:] + done.stderr[-1000:]
