"""wandb (the real package, offline), console output, interval metrics, stragglers, the report (the hang watchdog: test_hang.py)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from distrib.observe.trackers.process import has_credentials
from tests.helpers import REPO, child_env, read_metrics, read_summary, rewind, run_train

SMALL = ["--data.train_size", "2048", "--data.eval_size", "256", "--train.epochs", "2", "--train.log_every", "5", "--ckpt.every", "5"]


def _no_credentials(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in child_env().items() if not k.startswith("WANDB_") and k != "NETRC"}
    env["HOME"] = str(home)  # no ~/.netrc: nothing to log in with
    return {**env, **extra}


def read_wandb_offline(run_dir: Path) -> tuple[str, dict, list[dict]]:
    """(run id, config, history rows) from an offline run's .wandb file, read as wandb writes it.

    The file is wandb's LevelDB-style log (a 7-byte header, then 32 KiB blocks of records with a
    4-byte checksum, 2-byte length and 1-byte type: full, first, middle, last) of protobuf Records.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, block, chunks, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            records.append(chunks)
    run_id, config, rows = "", {}, []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        which = rec.WhichOneof("record_type")
        if which == "run":
            run_id = rec.run.run_id
            config = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
        elif which == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return run_id, config, rows


def test_offline_wandb_from_two_processes_matches_metrics_and_resume_keeps_the_id(tmp_path):
    run = tmp_path / "run"
    env = _no_credentials(tmp_path)
    assert not has_credentials(env)
    out = run_train([*SMALL, "--ckpt.keep", "100", "--run.dir", str(run), "--wandb.tags", "a,b"], nproc=2, env=env)
    assert "wandb: offline run" in out.stdout  # mode=auto without credentials: offline, no prompt (stdin is not a terminal)
    (first,) = list((run / "wandb").glob("offline-run-*"))  # exactly one run, from rank 0
    run_id, config, rows = read_wandb_offline(first)
    assert first.name.endswith(run_id) and config["train"]["log_every"] == 5 and config["wandb"]["tags"] == ["a", "b"]
    by_step = {r["_step"]: r for r in rows}
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    evals = [r for r in read_metrics(run) if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [5, 10, 15, 16, 20, 25, 30, 32] and len(evals) == 2  # 16 steps an epoch
    for rec in train:
        row = by_step[rec["step"]]
        assert row["train/loss"] == rec["loss"] and row["train/samples_per_s"] == rec["samples_per_s"] and row["train/lr"] == rec["lr"]
    for rec in evals:
        assert by_step[rec["step"]]["eval/accuracy"] == rec["accuracy"]

    # Resume from a mid-run checkpoint: the same wandb run id is used again.
    rewind(run, 21)
    out = run_train([*SMALL, "--ckpt.keep", "100", "--run.dir", str(run)], nproc=2, env=env)
    assert "resumed from" in out.stdout and f"wandb: offline run {run_id}" in out.stdout
    second = [p for p in (run / "wandb").glob("offline-run-*") if p != first]
    assert len(second) == 1 and read_wandb_offline(second[0])[0] == run_id


def test_a_broken_wandb_only_warns(tmp_path):
    # Online with a key that cannot work and a server that is not there: wandb fails, training does not.
    env = _no_credentials(tmp_path, WANDB_API_KEY="x" * 40, WANDB_BASE_URL="http://127.0.0.1:9")
    args = [*SMALL, "--train.epochs", "1", "--wandb.mode", "online", "--wandb.init_timeout_s", "15", "--run.dir", str(tmp_path / "run")]
    out = run_train(args, nproc=1, env=env, timeout=180)
    # wandb retries until its init timeout; training ends first and does not wait for it past a grace period.
    said = out.stdout + out.stderr
    assert "wandb: could not start (" in said or "wandb: had not started 5 s after training ended" in said
    assert read_summary(tmp_path / "run")["optimizer_steps"] == 32


def test_non_tty_output_is_one_line_per_interval_and_rank1_is_quiet(tmp_path):
    out = run_train([*SMALL, "--wandb.mode", "disabled", "--run.dir", str(tmp_path / "run")], nproc=2)
    lines = (out.stdout + out.stderr).splitlines()
    train_lines = [line for line in lines if " train step " in line]
    assert len(train_lines) == len([r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]) == 8
    assert all(line.startswith("[rank0] train step") for line in train_lines)
    assert not [line for line in lines if line.startswith("[rank1]")]  # no warnings happened, so nothing from rank 1
    assert "\r" not in out.stdout


def test_a_terminal_gets_a_progress_bar(tmp_path):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    cmd = [sys.executable, "-m", "distrib.train", *SMALL, "--wandb.mode", "disabled", "--run.dir", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "\r" in text and "64/64" in text and "step/s" in text and "loss=" in text  # tqdm: steps, rate, ETA, loss
    assert " train step " not in text  # the bar replaces the per-interval lines


def slow_job(tmp_path: Path, *args: str, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(REPO / "tests/slow_job.py"),
        "--data.train_size",
        "1024",
        "--data.eval_size",
        "128",
        "--train.epochs",
        "1",
        "--train.log_every",
        "2",
        "--wandb.mode",
        "disabled",
        "--run.dir",
        str(tmp_path / "run"),
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=child_env(PYTHONPATH=str(REPO), **env), capture_output=True, text=True, timeout=180)


def test_data_wait_rises_with_a_slow_dataset(tmp_path):
    fast = slow_job(tmp_path / "fast")
    slow = slow_job(tmp_path / "slow", SLOW_RANK="-2", SLOW_MS="0.5")
    assert fast.returncode == slow.returncode == 0, slow.stderr[-2000:]
    f = [r["data_wait_frac"] for r in read_metrics(tmp_path / "fast" / "run") if r["kind"] == "train"]
    s = [r["data_wait_frac"] for r in read_metrics(tmp_path / "slow" / "run") if r["kind"] == "train"]
    assert min(s) > 0.6 and sorted(f)[len(f) // 2] < 0.4, (f, s)


def test_a_slow_rank_is_named_as_the_straggler(tmp_path):
    done = slow_job(tmp_path, SLOW_RANK="1", SLOW_MS="0.5")
    assert done.returncode == 0, done.stderr[-2000:]
    train = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    named = [r for r in train if r.get("straggler") == 1 and r["slowest_rank"] == 1]
    # Named once sustained: from the third log interval on.
    assert len(named) >= 0.75 * (len(train) - 2), [(r["rank_step_time_min_s"], r["rank_step_time_max_s"]) for r in train]
    assert not [r for r in train if r.get("straggler") == 0]
    assert "straggler: rank 1 takes" in done.stdout + done.stderr
    assert all(r["peak_mem_bytes"] > 10 * 2**20 for r in train)  # the process RSS on CPU


def test_report_writes_a_png_and_a_summary(tmp_path):
    run = tmp_path / "run"
    run_train([*SMALL, "--wandb.mode", "disabled", "--run.dir", str(run)], nproc=1)
    out = subprocess.run([sys.executable, "-m", "distrib.cli", "report", str(run)], cwd=REPO, env=child_env(), capture_output=True, text=True, check=True)
    png = run / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000
    assert "14 train intervals, 2 evals, last step 64" in out.stdout and "eval at step 64" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "distrib.cli", "report", str(tmp_path / "nope")], cwd=REPO, env=child_env(), capture_output=True, text=True)
    assert missing.returncode == 2 and "metrics.jsonl does not exist" in missing.stderr


def test_mfu_follows_from_the_declared_flops_and_the_peak(tmp_path):
    from distrib.cli.task import TaskConfig, make_model

    run = tmp_path / "run"
    run_train([*SMALL, "--train.epochs", "1", "--train.peak_flops", "1e9", "--wandb.mode", "disabled", "--run.dir", str(run)], nproc=1)
    params = sum(p.numel() for p in make_model(TaskConfig(), seed=0).parameters())
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert train and all(r["mfu"] == pytest.approx(r["samples_per_s"] * 6 * params / 1e9, rel=1e-9) for r in train)
    assert "tokens_per_s" not in train[0]  # the built-in task declares no tokens
