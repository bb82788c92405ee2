"""wandb follows its users' environment conventions, and can neither slow nor stop the job (the real
package, in its own process, against a wandb server on loopback that accepts and never answers)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from distrib.tracking import resolve_mode
from tests.helpers import child_env, read_metrics, read_summary, run_train

SMALL = ["--data.train_size", "1024", "--data.eval_size", "128", "--train.epochs", "1", "--train.log_every", "4"]


@pytest.mark.parametrize(
    "mode, env, expected",
    [
        (None, {"WANDB_MODE": "disabled"}, "disabled"),
        (None, {"WANDB_DISABLED": "true"}, "disabled"),
        (None, {"WANDB_MODE": "dryrun"}, "offline"),
        (None, {}, "offline"),  # auto without credentials: offline, never a login prompt
        (None, {"WANDB_MODE": "offline", "WANDB_DISABLED": "true"}, "offline"),  # WANDB_MODE is the more specific
        ("offline", {"WANDB_MODE": "disabled"}, "offline"),  # distrib's key, set explicitly, wins
        ("disabled", {"WANDB_MODE": "online", "WANDB_API_KEY": "k" * 40}, "disabled"),
    ],
)
def test_the_mode_comes_from_distribs_key_then_wandbs_environment(tmp_path, mode, env, expected):
    assert resolve_mode(mode, {"HOME": str(tmp_path), **env}) == expected


def test_wandb_disabled_by_its_environment_variable_writes_no_run_and_wandb_dir_is_honoured(tmp_path):
    out = run_train([*SMALL, "--run.dir", str(tmp_path / "off")], env=child_env(WANDB_MODE="disabled"))
    assert not (tmp_path / "off" / "wandb").exists() and "wandb" not in out.stdout + out.stderr
    elsewhere = tmp_path / "wandb-dir"
    out = run_train([*SMALL, "--run.dir", str(tmp_path / "on")], env=child_env(WANDB_DIR=str(elsewhere)))
    assert "wandb: offline run" in out.stdout
    assert list((elsewhere / "wandb").glob("offline-run-*")) and not (tmp_path / "on" / "wandb").exists()


@pytest.fixture
def silent_server():
    """A TCP server on loopback that accepts connections and never answers: wandb.init waits on it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for c in held:
        c.close()


def test_a_wandb_init_that_hangs_delays_no_step_and_does_not_fail_the_job(tmp_path, silent_server):
    env = child_env(WANDB_BASE_URL=silent_server, WANDB_API_KEY="k" * 40)
    # init may take 600 s: the job (subprocess limit 120 s) could not finish if anything waited for it.
    args = [*SMALL, "--wandb.mode", "online", "--wandb.init_timeout_s", "600", "--run.dir", str(tmp_path / "run")]
    out = run_train(args, nproc=2, env=env, timeout=120)
    assert "wandb: the run had not started" in out.stdout + out.stderr  # one warning
    assert "wandb: online run" not in out.stdout  # it never started, yet:
    lines = read_metrics(tmp_path / "run")
    assert [l["step"] for l in lines if l["kind"] == "train"] == [4, 8] and read_summary(tmp_path / "run")["optimizer_steps"] == 8


def test_the_wandb_process_and_its_service_run_at_the_lowest_cpu_priority(tmp_path, monkeypatch):
    # Tracking must not take cores from the ranks: the worker process nices itself to 19 before
    # wandb.init, and the wandb service it starts inherits that.
    import os
    import time

    from distrib.config import WandbConfig
    from distrib.tracking import start

    if not hasattr(os, "getpriority"):
        pytest.skip("no process priorities here")
    monkeypatch.setenv("HOME", str(tmp_path))  # no credentials: an offline run
    tracker = start(WandbConfig(mode="offline"), run_dir=str(tmp_path), config={}, run_id=None)
    try:
        deadline, nice = time.monotonic() + 20, None
        while time.monotonic() < deadline and nice != 19:
            nice = os.getpriority(os.PRIO_PROCESS, tracker._proc.pid)
            time.sleep(0.05)
        assert nice == 19
        children: list[int] = []
        while time.monotonic() < deadline and not children:  # the service wandb.init starts
            children = [int(c) for c in Path(f"/proc/{tracker._proc.pid}/task/{tracker._proc.pid}/children").read_text().split()]
            time.sleep(0.05)
        assert children and all(os.getpriority(os.PRIO_PROCESS, c) == 19 for c in children)
    finally:
        tracker.finish()


def test_a_run_without_wandb_or_a_report_imports_neither(tmp_path):
    code = ("import sys, distrib.train as t; t.main(['--data.train_size', '256', '--train.epochs', '1', '--wandb.mode', 'disabled', "
            f"'--run.dir', {str(tmp_path / 'run')!r}]); print(sorted(m for m in ('wandb', 'matplotlib') if m in sys.modules))")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
