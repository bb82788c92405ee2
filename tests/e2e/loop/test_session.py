"""The open API's blocks: your own loop on a Session ends where `fit` ends, at one process and many;
a Session has no side effects until it writes; checkpoints of your own objects resume bit-exact and
are loaded as data, never as code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, child_env, read_summary

pytest.importorskip("sklearn")


def _example(script: str, run_dir, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launch, str(REPO / "examples" / script), "--run.dir", str(run_dir), "--wandb.mode", "disabled", "--train.epochs", "3", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# 2 ranks, accumulation with a short last step (1348 samples: 674 a rank = 21 x 32 + 2).
TWO_RANKS = ("--train.grad_accum", "2", "--train.epochs", "8")


@pytest.fixture(scope="module")
def own_two_ranks(tmp_path_factory):
    """examples/own_loop.py at 2 ranks, uninterrupted: the reference for the tests that stop and resume it."""
    run = tmp_path_factory.mktemp("own")
    _example("own_loop.py", run, *TWO_RANKS, nproc=2)
    return run


def test_your_own_loop_on_the_blocks_ends_at_fits_parameters_under_torchrun(tmp_path, own_two_ranks):
    _example("digits.py", tmp_path / "fit", *TWO_RANKS, nproc=2)
    fit_s, own_s = read_summary(tmp_path / "fit"), read_summary(own_two_ranks)
    assert own_s["params_sha256"] == fit_s["params_sha256"]  # bit for bit
    assert own_s["world_size"] == fit_s["world_size"] == 2 and own_s["optimizer_steps"] == fit_s["optimizer_steps"] == 8 * 11
    assert own_s["eval"]["count"] == fit_s["eval"]["count"] == 449
    assert own_s["eval"]["accuracy"] == fit_s["eval"]["accuracy"] >= 0.9
    model = torch.load(own_two_ranks / "model.pt", weights_only=True)
    assert set(model) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # the module's own keys


def test_your_own_loop_with_a_global_batch_on_one_process_ends_where_fit_does_on_two(tmp_path):
    # train.global_batch_size: the own loop's train_loader splits it as fit's does (here 16 x 4 x 1 and 16 x 2 x 2).
    gb = ("--train.global_batch_size", "64", "--train.batch_size", "16")
    out = _example("own_loop.py", tmp_path / "own", *gb)
    assert "global batch 64 = 16 per micro-batch x 4 micro-batches x 1 process" in out.stdout
    _example("digits.py", tmp_path / "fit", *gb, nproc=2)
    own, fit = (torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("own", "fit"))
    assert max((own[k] - fit[k]).abs().max().item() for k in own) <= 1e-5
    steps = [read_summary(tmp_path / name)["optimizer_steps"] for name in ("own", "fit")]
    assert steps == [3 * 22, 3 * 22]  # 1348 samples: 21 steps of 64 and one of 4


def test_your_own_loop_resumes_bit_exact(tmp_path):
    whole = tmp_path / "whole"
    _example("own_loop.py", whole)
    cut = tmp_path / "cut"
    _example("own_loop.py", cut, "--train.epochs", "2")  # "killed" after epoch 2 of 3
    out = _example("own_loop.py", cut)
    assert read_summary(cut)["params_sha256"] == read_summary(whole)["params_sha256"]
    assert read_summary(cut)["optimizer_steps"] == 3 * 43
    evals = [json.loads(l) for l in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 1, 2] and "eval accuracy" in out.stdout


def test_a_planted_pickle_in_a_checkpoint_runs_nothing(tmp_path):
    run = tmp_path / "run"
    _example("digits.py", run, "--train.epochs", "1")
    newest = sorted((run / "checkpoints").iterdir())[-1]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"objects": Evil()}, newest / "state.pt")
    manifest = json.loads((newest / "MANIFEST.json").read_text())
    from distrib.checkpoint.store import _sha256

    manifest["files"]["state.pt"] = {"size": (newest / "state.pt").stat().st_size, "sha256": _sha256(newest / "state.pt")}
    (newest / "MANIFEST.json").write_text(json.dumps(manifest))  # whoever plants the file writes the manifest too
    before = (run / "metrics.jsonl").read_bytes()
    cmd = [sys.executable, str(REPO / "examples" / "digits.py"), "--run.dir", str(run), "--wandb.mode", "disabled", "--train.epochs", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "distrib: error:" in proc.stderr and "more than plain data" in proc.stderr
    assert not marker.exists()
    assert (run / "metrics.jsonl").read_bytes() == before  # a refused resume changes no file


def test_your_own_loop_stops_like_fit_and_resumes_bit_exact(tmp_path, own_two_ranks):
    """A signal to one rank of an own loop: every rank saves at the same step, the session writes stopped.json
    and says how to resume, `return distrib.EXIT_STOPPED` exits 75, and the same command finishes bit-exact."""
    import signal
    import time

    args = ["--run.dir", str(tmp_path / "stopped"), "--wandb.mode", "disabled", *TWO_RANKS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "examples" / "own_loop.py"), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() or not metrics.read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[-1]), signal.SIGTERM)  # one rank alone
    out, _ = proc.communicate(timeout=120)
    assert "exitcode  : 75" in out and "received by 1 of 2 ranks: stopping with a checkpoint" in out, out[-3000:]
    assert "[rank0] stopped at step" in out and "Exit status 75: run the same command again" in out
    stopped = json.loads((tmp_path / "stopped" / "stopped.json").read_text())
    assert stopped["signal"] == "SIGTERM" and stopped["exit_status"] == 75 and stopped["step"] % 10 == 0
    assert not (tmp_path / "stopped" / "summary.json").exists()
    _example("own_loop.py", tmp_path / "stopped", *TWO_RANKS, nproc=2)
    assert read_summary(tmp_path / "stopped")["params_sha256"] == read_summary(own_two_ranks)["params_sha256"]


SCRIPT = """
import argparse, sys
import distrib
parser = argparse.ArgumentParser(description="my script", epilog=distrib.config_help(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data-path", default="data/")
args, rest = parser.parse_known_args()   # the script's own flags; the rest are distrib's
sys.exit(distrib.main(lambda cfg: print("ok", args.data_path, cfg.train.epochs), argv=rest))
"""


@pytest.mark.parametrize(
    "argv, code, says",
    [
        (["--help"], 0, "usage: "),
        (["--trian.epochs", "3"], 2, "distrib: error: "),
        (["--train.epochs", "3"], 0, "ok data/ 3"),
    ],
)
def test_parse_config_on_the_command_line_exits_like_argparse(tmp_path, argv, code, says):
    script = tmp_path / "plain.py"
    script.write_text("import distrib\ncfg = distrib.parse_config()\nprint('ok', 'data/', cfg.train.epochs)\n")
    done = subprocess.run([sys.executable, str(script), *argv], env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == code and says in done.stdout + done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_script_with_its_own_argparse_shares_help_and_flags(tmp_path):
    script = tmp_path / "mine.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), "--help"], env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--data-path" in done.stdout and "--train.epochs INT" in done.stdout
    done = subprocess.run([sys.executable, str(script), "--data-path", "d", "--train.epochs", "4"], env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok d 4", done.stderr
    done = subprocess.run([sys.executable, str(script), "--train.epoch", "4"], env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "distrib: error: Unknown config key 'train.epoch'" in done.stderr and "Traceback" not in done.stderr
