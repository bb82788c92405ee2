"""End to end: `python -m distrib.train` and real `torchrun --nproc_per_node=2` on gloo."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from distrib.cli.task import TaskConfig, make_model
from distrib.parallel.wrap import params_sha256
from tests.helpers import REPO, child_env, read_metrics, read_summary, run_train

# SGD, no dropout, 200 samples: 100 per rank at 2 processes, so each epoch ends on a short step
# (32+32+32+4 per rank), and 2 epochs.
EXACT = [
    "--optim.name",
    "sgd",
    "--optim.lr",
    "0.5",
    "--optim.schedule",
    "cosine",
    "--task.dropout",
    "0",
    "--data.train_size",
    "200",
    "--data.eval_size",
    "64",
    "--train.epochs",
    "2",
    "--train.log_every",
    "2",
]


def _params(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def _assert_same_params(a, b) -> None:
    pa, pb, p0 = _params(a), _params(b), make_model(TaskConfig(), seed=0).state_dict()
    assert pa.keys() == pb.keys() == p0.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)
    # The test can fail: training moved the parameters far beyond the tolerance.
    assert max((pa[k] - p0[k]).abs().max().item() for k in pa) > 1e-2


def test_main_job_learns_and_writes_the_contract_files(tmp_path):
    run = tmp_path / "main"
    env = child_env(PYTHON=sys.executable)
    proc = subprocess.run(["bash", "launch/local.sh", "--run.dir", str(run)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run)
    assert summary["world_size"] == 2 and summary["launcher"] == "torchrun"
    assert summary["eval"]["count"] == 2048
    assert summary["eval"]["accuracy"] >= 0.9  # chance is 1/8
    assert summary["samples_seen"] == 4 * 16384 and summary["optimizer_steps"] == 4 * 128
    lines = read_metrics(run)
    train = [l for l in lines if l["kind"] == "train"]
    evals = [l for l in lines if l["kind"] == "eval"]
    assert {"step", "epoch", "loss", "lr", "samples"} <= train[0].keys()
    assert [e["epoch"] for e in evals] == [0, 1, 2, 3] and all(e["count"] == 2048 for e in evals)
    assert evals[-1]["accuracy"] == summary["eval"]["accuracy"]
    assert train[-1]["loss"] < train[0]["loss"] / 2
    state = _params(run)
    assert not any(k.startswith("module.") for k in state)
    model = make_model(TaskConfig(), seed=0)
    model.load_state_dict(state)
    assert params_sha256(model) == summary["params_sha256"]
    assert (run / "config.json").is_file()
    # Only rank 0 prints progress; no rank-1 lines on stdout.
    assert "[rank0] train step" in proc.stdout and "[rank1]" not in proc.stdout


def test_debug_launcher_runs_one_process_and_prints_the_first_batch(tmp_path):
    run = tmp_path / "dbg"
    env = child_env(PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", "launch/debug.sh", "--run.dir", str(run), "--data.num_workers", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = read_summary(run)
    assert (s["world_size"], s["launcher"], s["optimizer_steps"]) == (1, "single", 10)
    assert "batch[0]: float32[64, 32] on cpu" in proc.stdout and "batch[1]: int64[64] on cpu" in proc.stdout


def test_debug_under_torchrun_is_refused(tmp_path):
    proc = run_train(["--debug", "--run.dir", str(tmp_path / "x")], nproc=2, check=False)
    assert proc.returncode != 0
    assert "--debug runs one process" in proc.stderr and not (tmp_path / "x").exists()


def test_dataset_smaller_than_world_size_under_torchrun(tmp_path):
    proc = run_train(["--data.train_size", "1", "--run.dir", str(tmp_path / "never")], nproc=2, check=False)
    assert proc.returncode != 0
    assert "train dataset has 1 samples but the job has 2 processes" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_console_script_is_installed():
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "distrib"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout


def test_compiled_ddp_with_accumulation_matches_eager(tmp_path):
    args = [*EXACT, "--train.batch_size", "16", "--train.grad_accum", "2", "--train.epochs", "1"]
    run_train([*args, "--run.dir", str(tmp_path / "compiled"), "--train.compile"], nproc=2, timeout=400)
    run_train([*args, "--run.dir", str(tmp_path / "eager")], nproc=2)
    _assert_same_params(tmp_path / "compiled", tmp_path / "eager")


def test_the_command_skips_the_exit_collections_yet_finalises_what_was_dropped(tmp_path):
    # `python -m distrib.train` collects at exit, flushes open files, then freezes what is alive
    # (distrib/shutdown.py). A handler registered before the run runs after that one and must see
    # the freeze; a reference cycle dropped as the command returns must still be finalised (its
    # __del__ writes a file); a file a class attribute holds open, which only the shutdown's
    # collections would have flushed, must keep its write, and one whose flush fails is reported.
    marker, held, run = tmp_path / "finalised", tmp_path / "held.txt", tmp_path / "run"
    code = f"""
import atexit, gc, runpy, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))
class Cycle:
    def __del__(self):
        open({str(marker)!r}, "w").close()
class Holder:
    log = open({str(held)!r}, "w")
    full = open("/dev/full", "w")  # its flush fails: reported, as Python's exit reports it
Holder.log.write("kept")
Holder.full.write("lost")
sys.argv = ["distrib.train", "--data.train_size", "256", "--train.epochs", "1", "--data.num_workers", "2",
            "--wandb.mode", "disabled", "--run.dir", {str(run)!r}]
try:
    runpy.run_module("distrib.train", run_name="__main__", alter_sys=True)
finally:
    gc.disable()  # from here only the exit's own collection can find the cycle
    c = Cycle(); c.self = c; del c
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_summary(run)["optimizer_steps"] == 4
    assert "frozen at exit: True" in proc.stdout
    assert marker.exists() and held.read_text() == "kept"
    assert "Exception ignored while flushing <_io.TextIOWrapper name='/dev/full'" in proc.stderr


def test_main_called_as_a_function_leaves_the_exit_alone(tmp_path):
    # Only the commands (`command()`) freeze at exit; `main(argv)` is also an API (tests call it).
    code = (
        "import atexit, gc; atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0)); "
        "import distrib.cli.main, distrib.slurm, distrib.train as t; t.main(['--help'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frozen at exit: False" in proc.stdout
