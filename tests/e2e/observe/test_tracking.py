"""wandb follows its users' environment conventions, and can neither slow nor stop the job (the real
package, in its own process, against a wandb server on loopback that accepts and never answers)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env, read_metrics, read_summary, run_train

SMALL = ["--data.train_size", "1024", "--data.eval_size", "128", "--train.epochs", "1", "--train.log_every", "4"]


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
    assert "wandb: had not started 5 s after training ended" in out.stdout + out.stderr  # one warning
    assert "wandb: online run" not in out.stdout  # it never started, yet:
    lines = read_metrics(tmp_path / "run")
    assert [l["step"] for l in lines if l["kind"] == "train"] == [4, 8] and read_summary(tmp_path / "run")["optimizer_steps"] == 8


def test_the_wandb_process_and_its_service_run_only_in_idle_time_and_in_the_ranks_scheduling_group(tmp_path, monkeypatch):
    # Tracking must not take cores from the ranks. The worker takes the idle policy (a waking rank
    # preempts it at once) and the wandb service inherits it. The worker has a process group of its
    # own but stays in our session: a new session is a new Linux autogroup, which gets a fair share
    # of the CPU against the rank whatever the priorities inside it.
    import os
    import select

    from distrib.config import Config, RunConfig, WandbConfig
    from distrib.observe.trackers.process import start

    if not hasattr(os, "SCHED_IDLE"):
        pytest.skip("the idle scheduling policy is Linux's")
    monkeypatch.setenv("HOME", str(tmp_path))  # no credentials: an offline run
    tracker = start(Config(run=RunConfig(dir=str(tmp_path)), wandb=WandbConfig(mode="offline")), run_id="idle0001")
    try:
        assert select.select([tracker._started], [], [], 60)[0]  # wandb.init is over: its service runs
        worker = tracker._proc.pid
        assert os.sched_getscheduler(worker) == os.SCHED_IDLE and os.getpriority(os.PRIO_PROCESS, worker) == 19
        # Each tracker starts on a thread of its own: a child is listed under the thread that started it.
        children = [int(c) for task in Path(f"/proc/{worker}/task").iterdir() for c in (task / "children").read_text().split()]
        service = [c for c in children if "wandb-core" in Path(f"/proc/{c}/cmdline").read_text()]
        assert service and all(os.sched_getscheduler(c) == os.SCHED_IDLE for c in service)
        assert os.getpgid(worker) == worker and os.getsid(worker) == os.getsid(0)
        # The scheduling group the kernel shares the CPU by: the autogroup ("/autogroup-<id> nice <n>"),
        # or, where a cgroup's CPU controller groups the task instead (as in CI), the autogroup file
        # reads empty and the cgroup is the group. Either way the worker shares the rank's.
        group = Path("/proc/self/autogroup")
        kind = "autogroup" if group.exists() and group.read_text().strip() else "cgroup"
        ours = Path(f"/proc/self/{kind}").read_text()
        assert ours.strip(), f"/proc/self/{kind} is empty: nothing to compare"
        assert Path(f"/proc/{worker}/{kind}").read_text() == ours
    finally:
        tracker.finish()
    assert tracker._proc.returncode == 0


def test_the_wandb_process_skips_the_launch_inputs_look_that_only_a_users_own_process_could_need(tmp_path):
    # wandb.init imports W&B Launch's agent and API (~0.15 s of CPU, on cores the ranks use) to apply
    # inputs staged in the calling process; the worker process runs no user code, so it skips that.
    import subprocess
    import sys

    code = (
        "import sys, types; sys.path.insert(0, 'distrib/observe/trackers'); import wandb_tracker; tracker = wandb_tracker.WandbTracker(); "
        f"tracker.start(types.SimpleNamespace(dir={str(tmp_path)!r}, options={{'wandb': {{'mode': 'offline', 'dir': {str(tmp_path)!r}, 'id': 'skiplaunch', "
        "'project': 'p', 'config': {'a': 1}, 'init_timeout': 60}})); tracker.log({'kind': 'train', 'step': 1, 'x': 1.0}); "
        "tracker.finish(None, 'finished'); print(sorted(m for m in sys.modules if m.startswith('wandb.sdk.launch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(HOME=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wandb: offline run skiplaunch" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]"
    assert list((tmp_path / "wandb").glob("offline-run-*-skiplaunch/run-skiplaunch.wandb"))


def test_a_run_without_trackers_a_report_or_a_profile_imports_none_and_ddp_checkpoints_do_not_import_dcp(tmp_path):
    # DCP (torch.distributed.checkpoint) is FSDP's: importing it took ~60 ms inside the first checkpoint's step.
    # Without train.profile, nothing of distrib's profiler is imported (and no profiler runs).
    code = (
        "import sys, distrib.train as t; t.main(['--data.train_size', '256', '--train.epochs', '1', '--wandb.mode', 'disabled', "
        f"'--ckpt.every', '2', '--run.dir', {str(tmp_path / 'run')!r}]); "
        "print(sorted(m for m in ('wandb', 'matplotlib', 'torch.distributed.checkpoint', 'distrib.observe.profile') if m in sys.modules))"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]" and len(list((tmp_path / "run" / "checkpoints").glob("step-*"))) >= 2
