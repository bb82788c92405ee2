"""run.report_to's trackers and train.profile's traces on real runs at 2 ranks: TensorBoard's event files, an
MLflow file store, a CSV and a tracker of the user's own hold what metrics.jsonl holds, one run across a
stop, a kill and two resumes; a tracker that hangs or raises neither slows nor fails the job."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, child_env, kill_tree, read_metrics, read_summary, run_train

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

REPORT = "tensorboard,mlflow,csv,examples.my_tracker:LossFile"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in child_env().items() if not k.startswith("MLFLOW_")}  # the defaults: a file store in run.dir
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # examples.my_tracker
    return env


def _launch(run: Path, **env: str) -> subprocess.Popen:
    args = ["--data.train_size", "2048", "--data.eval_size", "256", "--train.epochs", "1", "--train.batch_size", "16", "--train.log_every", "2"]
    args += ["--ckpt.every", "4", "--run.report_to", REPORT, "--train.profile", "5:7", "--wandb.mode", "disabled", "--run.dir", str(run)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tests.slow_job", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + 120
    while not any(r["kind"] == "train" and r["step"] >= step for r in _records(run)):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the step it was to be stopped at"
        time.sleep(0.02)


def _records(run: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
    except FileNotFoundError:
        return []


def test_tensorboard_mlflow_csv_and_an_own_tracker_hold_metrics_jsonl_across_a_stop_a_kill_and_resumes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    # Attempt 1: a graceful stop (SIGTERM) after the profiled window.
    proc = _launch(run, SLOW_RANK="-2", SLOW_MS="2")
    _wait_for_step(run, proc, 10)
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert "SIGTERM received by 2 of 2 ranks" in out, out[-3000:]  # (torchrun itself exits 1 when signalled)
    stopped = json.loads((run / "stopped.json").read_text())["step"]
    # Attempt 2: resumed, then killed outright (no flush, no end): the trackers may lag behind metrics.jsonl.
    proc = _launch(run, SLOW_RANK="-2", SLOW_MS="2")
    deadline = time.monotonic() + 60
    while len(list((run / "tensorboard").glob("events.out.tfevents.*"))) < 2:  # this attempt's trackers are up
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    _wait_for_step(run, proc, stopped + 14)
    kill_tree(proc)
    # Attempt 3: resumed from the last checkpoint, to the end.
    proc = _launch(run)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0 and out.count("resumed from") == 1, out[-3000:]

    records = read_metrics(run)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    assert [s for s, _ in train] == list(range(2, 65, 2))  # every interval once (64 steps: 2048 / (2 x 16))
    evals = [(r["step"], r["loss"]) for r in records if r["kind"] == "eval"]
    assert len(evals) == 1 and read_summary(run)["optimizer_steps"] == 64

    # TensorBoard: read back with its own reader (which applies the resumes' purge markers). float32 values.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, float(np.float32(v))) for s, v in train]
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(s, float(np.float32(v))) for s, v in evals]
    # (Had rank 1 written events too, every step would be there twice.) Each resumed attempt's file opens with
    # TensorBoard's purge marker (SummaryWriter's purge_step): a session start at the step after its checkpoint.
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    starts = []
    for path in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        starts += [e.step for e in LegacyEventFileLoader(str(path)).Load() if e.HasField("session_log") and e.session_log.status == 1]
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", out).group(1))
    assert starts in ([stopped + 1, resumed + 1], [resumed + 1])  # (the killed attempt's may not have reached its file)

    # MLflow: one run over the three attempts, the same history, the config as params.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    client = MlflowClient((run / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("distrib")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "run"
    history = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert history == train
    params = runs[0].data.params
    assert params["train.batch_size"] == "16" and params["run.report_to"] == json.dumps(REPORT.split(","))
    assert runs[0].data.metrics["summary/optimizer_steps"] == 64

    # CSV: a row per record, in order.
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["kind"], int(r["step"]), float(r["loss"])) for r in rows] == [(r["kind"], r["step"], r["loss"]) for r in records]

    # The user's own tracker (examples/my_tracker.py).
    lines = (run / "losses.txt").read_text().split("\n")[:-1]
    assert [(int(s), float(v)) for s, v in (line.split() for line in lines)] == train

    # The profiler: one trace per rank, with the window's steps marked; the steps marked in metrics.jsonl.
    traces = sorted((run / "profile").iterdir())
    assert [p.name for p in traces] == ["rank0.steps5-7.pt.trace.json", "rank1.steps5-7.pt.trace.json"]
    for trace in traces:
        names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
        assert sorted(n for n in names if str(n).startswith("ProfilerStep#")) == ["ProfilerStep#5", "ProfilerStep#6", "ProfilerStep#7"]
    assert [(r["step"], r["profiled"]) for r in records if "profiled" in r] == [(6, [5, 6]), (8, [7])]


def test_a_tracker_that_hangs_or_raises_neither_delays_nor_fails_the_job(tmp_path):
    # An MLflow server that never answers (its start hangs), a tracker whose log hangs, one whose log raises:
    # training runs to the end, metrics.jsonl and the CSV are whole, and the end waits run.tracker_timeout_s at most.
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    report = "tests.trackers:Mutates,mlflow,csv,tests.trackers:HangsInLog,tests.trackers:RaisesInLog"
    args = ["--data.train_size", "1024", "--data.eval_size", "128", "--train.epochs", "1", "--train.log_every", "4"]
    args += ["--run.report_to", report, "--run.tracker_timeout_s", "3", "--run.dir", str(tmp_path / "run")]
    try:
        out = run_train(args, nproc=2, env=_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{server.getsockname()[1]}"), timeout=120)
    finally:
        server.close()
    log = out.stdout + out.stderr
    assert "mlflow: had not started 3 s after training ended" in log, log
    assert "tests.trackers:HangsInLog: did not flush in time" in log
    assert "tests.trackers:RaisesInLog: log failed (RuntimeError: the tracker's server said no); continuing without it" in log
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if r["kind"] == "train"] == [4, 8] and read_summary(tmp_path / "run")["optimizer_steps"] == 8
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:  # whole, and untouched by the tracker that edits its records
        assert [(r["kind"], int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)] == [(r["kind"], r["step"], r["loss"]) for r in records]


def test_a_tracker_that_takes_the_trackers_process_down_is_one_warning(tmp_path):
    out = run_train(
        ["--data.train_size", "512", "--train.epochs", "1", "--train.log_every", "2", "--run.report_to", "tests.trackers:Crashes", "--run.dir", str(tmp_path)],
        env=_env(),
    )
    assert "trackers: their process ended during the run (exit status 9: a tracker crashed it)" in out.stderr + out.stdout
    assert read_summary(tmp_path)["optimizer_steps"] == 8


@pytest.mark.parametrize(
    "report, expected",
    [
        (
            "tensorbord",
            "'tensorbord' is not one of wandb, tensorboard, mlflow, csv, none (or module:Class for your own). HINT: pass --run.report_to tensorboard.",
        ),
        ("csv,nosuch.module:Tracker", "the tracker 'nosuch.module:Tracker' does not import (ModuleNotFoundError"),
    ],
)
def test_a_tracker_that_cannot_start_is_exit_2_before_anything_is_written(tmp_path, report, expected):
    out = run_train(["--run.report_to", report, "--run.dir", str(tmp_path / "run")], check=False, env=_env())
    assert out.returncode == 2 and expected in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_planted_link_where_the_profiles_go_is_exit_2_before_anything_is_written(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "profile").symlink_to(tmp_path / "elsewhere")
    out = run_train(["--train.profile", "2:3", "--run.dir", str(tmp_path / "run")], check=False, env=_env())
    assert out.returncode == 2 and "profile is a symbolic link" in out.stderr, out.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["profile"] and not list((tmp_path / "elsewhere").iterdir())
