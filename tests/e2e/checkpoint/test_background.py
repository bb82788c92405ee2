"""Asynchronous checkpoints: a snapshot later steps cannot change, the same bytes as a synchronous
save, an in-flight save that a SIGKILL interrupts is never a checkpoint, and the end waits for it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import torch

from distrib.checkpoint import store as ck
from tests.helpers import REPO, child_env, read_summary, run_train

ARGS = [
    "--task.dropout",
    "0.1",
    "--train.grad_accum",
    "2",
    "--train.batch_size",
    "16",
    "--data.train_size",
    "1024",
    "--data.eval_size",
    "64",
    "--train.epochs",
    "2",
    "--ckpt.every",
    "3",
    "--ckpt.keep",
    "100",
    "--wandb.mode",
    "disabled",
]


def test_async_checkpoints_hold_the_same_state_as_synchronous_ones_and_resume_bit_exact(tmp_path):
    run_train([*ARGS, "--ckpt.async", "false", "--run.dir", str(tmp_path / "sync")], nproc=2)
    run_train([*ARGS, "--run.dir", str(tmp_path / "async")], nproc=2)
    assert read_summary(tmp_path / "sync")["params_sha256"] == read_summary(tmp_path / "async")["params_sha256"]
    steps = [p.name for p in ck.candidates(tmp_path / "sync" / "checkpoints")]
    assert steps == [p.name for p in ck.candidates(tmp_path / "async" / "checkpoints")] and len(steps) == 12
    for name in steps:  # the state of step N, not of whatever step the background write overlapped
        a, b = (ck.load_file(tmp_path / kind / "checkpoints" / name / "state.pt")["objects"] for kind in ("sync", "async"))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["loader"] == b["loader"]
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        for rank in (0, 1):
            ra, rb = (ck.load_file(tmp_path / kind / "checkpoints" / name / ck.rank_file(rank)) for kind in ("sync", "async"))
            assert torch.equal(ra["rng"]["torch"], rb["rng"]["torch"])


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    import distrib

    cfg = distrib.Config().replace(**{"run.dir": sys.argv[1], "run.device": "cpu", "ckpt.keep": 10})
    with distrib.Session(cfg) as session:
        state = {"big": {"w": torch.zeros(16 * 2**20)}}  # 64 MiB: its write takes a while
        session.save(state, step=1)
        session.wait_for_save()
        state["big"]["w"] += 1
        session.save(state, step=2)  # returns once the snapshot is taken; the write runs in the background
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
    print("closed")  # the session's end waited for step 2
""")


def test_a_sigkill_during_an_async_save_leaves_the_previous_checkpoint_and_the_end_waits_for_it(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(SCRIPT)
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "killed"), "kill"], cwd=REPO, env=child_env(), timeout=120)
    assert killed.returncode == -signal.SIGKILL
    root = tmp_path / "killed" / "checkpoints"
    newest, manifest = ck.newest_good(root)
    assert newest.name == "step-000000001" and manifest["step"] == 1  # step 2 never became a checkpoint
    assert not ck.step_dir(root, 2).exists()
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "whole"), "end"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "closed" in done.stdout
    newest, manifest = ck.newest_good(tmp_path / "whole" / "checkpoints")
    assert manifest["step"] == 2 and ck.load_file(newest / "state.pt")["objects"]["big"]["w"].eq(1).all()
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["ckpt"]["async"] is True


STOP_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import distrib
    from distrib.cli.task import TaskConfig, TaskDataConfig, make_datasets, make_model

    class StopAfterFirstSave(distrib.Callback):
        def on_checkpoint(self, trainer, step):
            trainer.stop.set()  # as a signal handler would: the save of this step is still in flight

    def train(cfg):
        train_data, _ = make_datasets(cfg.task, train_size=cfg.data.train_size, eval_size=8, seed=0)
        model = make_model(cfg.task, seed=0)  # 2 x 1024 wide: a save takes a while
        return distrib.fit(cfg, model=model, optimizer=torch.optim.AdamW(model.parameters()), train_data=train_data,
                           callbacks=[StopAfterFirstSave()])

    sys.exit(distrib.main(train, sections={"task": TaskConfig, "data": TaskDataConfig}))
""")


def test_a_stop_while_a_save_is_in_flight_commits_both_before_exit_75(tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        str(script),
        "--run.dir",
        str(run),
        "--wandb.mode",
        "disabled",
        "--task.hidden",
        "1024",
        "--data.train_size",
        "2048",
        "--ckpt.every",
        "2",
        "--train.log_every",
        "3",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 75, proc.stderr[-3000:]
    stopped = json.loads((run / "stopped.json").read_text())
    assert stopped["step"] == 3  # the vote rode on the log at step 3
    root = run / "checkpoints"
    assert [p.name for p in ck.candidates(root)] == ["step-000000003", "step-000000002"]
    assert all(ck.verify(p)["step"] in (2, 3) for p in ck.candidates(root))  # both committed, none left in flight
    assert not list(root.glob("*.tmp"))
