"""End to end on CUDA (`pytest -m gpu`; conftest skips these on a machine without a GPU).

The CPU suite proves the logic on gloo; these prove the CUDA path a GPU user takes: the README's
launcher picking the GPUs, pinned loader memory with workers, the CUDA RNG and GradScaler state in
a checkpoint, mixed precision and torch.compile on the device.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distrib import fit
from distrib.cli.task import make_datasets, make_model
from tests.helpers import REPO, TaskData, child_env, read_summary, rewind, run_train

pytestmark = pytest.mark.gpu

RESUME = [
    "--run.device",
    "cuda",
    "--task.dropout",
    "0.1",
    "--train.grad_accum",
    "2",
    "--train.batch_size",
    "16",
    "--train.epochs",
    "2",
    "--data.train_size",
    "1024",
    "--data.eval_size",
    "256",
    "--data.num_workers",
    "2",
    "--ckpt.every",
    "5",
    "--ckpt.keep",
    "100",
    "--train.log_every",
    "50",
    "--wandb.mode",
    "disabled",
]


def test_the_readme_launcher_trains_on_every_gpu(tmp_path):
    run = tmp_path / "main"
    proc = subprocess.run(
        ["bash", "launch/local.sh", "--run.dir", str(run), "--wandb.mode", "disabled"],
        cwd=REPO,
        env=child_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = read_summary(run)
    assert s["world_size"] == torch.cuda.device_count() and s["device"] == "cuda:0"
    assert s["eval"]["count"] == 2048 and s["eval"]["accuracy"] >= 0.9


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_on_cuda_is_bit_exact(tmp_path, precision):
    """Dropout draws from the CUDA generator and fp16 keeps a GradScaler: both must come back from the checkpoint."""
    args = [*RESUME, "--train.precision", precision]
    run_train([*args, "--run.dir", str(tmp_path / "whole")])
    whole = read_summary(tmp_path / "whole")
    run = tmp_path / "cut"
    run_train([*args, "--run.dir", str(run)])
    rewind(run, 15)  # as if the job died after step 15, mid-epoch 0
    out = run_train([*args, "--run.dir", str(run)])
    assert "resumed from" in out.stdout and "step 15 (epoch 0" in out.stdout
    assert read_summary(run)["params_sha256"] == whole["params_sha256"]


def _fit_cuda(tmp_path, name: str, **dotted) -> dict:
    cfg = TaskData().replace(
        **{
            "run.dir": str(tmp_path / name),
            "run.device": "cuda",
            "data.train_size": 2048,
            "train.batch_size": 64,
            "train.epochs": 2,
            "wandb.mode": "disabled",
            **dotted,
        }
    )
    train, ev = make_datasets(cfg.task, train_size=2048, eval_size=512, seed=0)
    model = make_model(cfg.task, seed=0)
    return fit(cfg, model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3), train_data=train, eval_data=ev)


@pytest.mark.parametrize("setting", [{"train.precision": "bf16"}, {"train.precision": "fp16"}, {"train.compile": True}])
def test_precision_and_compile_on_cuda_learn_like_fp32(tmp_path, setting):
    ref = _fit_cuda(tmp_path, "fp32")
    got = _fit_cuda(tmp_path, "other", **setting)
    assert got["eval"]["count"] == ref["eval"]["count"] == 512
    assert ref["eval"]["accuracy"] > 0.5  # well above chance (1/8), so the comparison means something
    assert abs(got["eval"]["accuracy"] - ref["eval"]["accuracy"]) <= 0.05, (setting, got["eval"], ref["eval"])


def test_a_profiled_window_on_cuda_writes_a_trace_with_kernels_and_a_memory_snapshot_and_an_oom_leaves_one(tmp_path):
    run = tmp_path / "run"
    run_train(
        [
            "--run.device",
            "cuda",
            "--data.train_size",
            "1024",
            "--train.epochs",
            "1",
            "--train.batch_size",
            "32",
            "--train.profile",
            "3:4",
            "--run.dir",
            str(run),
        ]
    )
    trace = run / "profile" / "rank0.steps3-4.pt.trace.json"
    events = __import__("json").loads(trace.read_text())["traceEvents"]
    assert {"ProfilerStep#3", "ProfilerStep#4"} <= {e.get("name") for e in events}
    assert any(e.get("cat") == "kernel" for e in events), "no CUDA kernel in the trace"
    assert (run / "profile" / "rank0.steps3-4.memory.pickle").stat().st_size > 0
    # An out-of-memory error that ends a run (in an own loop: fit's pre-flight probe turns a batch too big into exit 2 first).
    oom = tmp_path / "oom"
    code = (
        "import torch, distrib\n"
        f"with distrib.Session(distrib.parse_config(['--run.device', 'cuda', '--run.dir', {str(oom)!r}])):\n"
        "    torch.empty(1 << 50, device='cuda')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "OutOfMemoryError" in out.stderr, out.stderr[-2000:]
    assert "rank0.oom.memory.pickle" in out.stdout + out.stderr and (oom / "profile" / "rank0.oom.memory.pickle").stat().st_size > 0


@pytest.mark.parametrize("selftest", [False, True])
def test_no_host_sync_on_any_step_path(selftest):
    # Token-weighted loss, bf16, asynchronous checkpoints, the non-finite guard's skip: no step but the log
    # steps synchronises with the host. The self-test plants a .item() and must be caught.
    cmd = [sys.executable, str(REPO / "bench/sync_paths.py"), *(["--selftest"] if selftest else [])]
    out = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    if selftest:  # caught, and at the planted line (not at some sync of distrib's own)
        assert out.returncode == 1 and "synchroniz" in out.stdout.lower() and "# planted" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    else:
        assert out.returncode == 0 and '"clean": true' in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
