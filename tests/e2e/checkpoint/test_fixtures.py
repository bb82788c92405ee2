"""Checkpoints written by earlier versions of distrib resume bit-exact with today's code.

Each fixture is a real 2-rank run of the built-in task stopped by `--train.max_steps 24` of 32 steps,
with its checkpoint, config.json and metrics.jsonl committed as they were written:

- `ckpt-format1`: DDP, before checkpoints had a format version or an `eval_step` (git 4de7d21).
- `ckpt-format2-ddp`, `ckpt-format2-fsdp`: DDP and FSDP, format 2, written before the package was
  split into folders (git 272683c). A move that changes what a checkpoint holds or how it is read
  fails here.

Resuming one to the end must give the parameters of the same run without a stop.
"""

from __future__ import annotations

import json
import shutil

import pytest

from distrib.checkpoint import store as ck
from tests.helpers import REPO, read_summary, run_train

ARGS = [
    "--task.hidden",
    "16",
    "--data.train_size",
    "512",
    "--data.eval_size",
    "64",
    "--train.batch_size",
    "16",
    "--train.epochs",
    "2",
    "--ckpt.every",
    "8",
    "--ckpt.keep",
    "1",
    "--wandb.mode",
    "disabled",
    "--optim.schedule",
    "constant",
    "--train.log_every",
    "8",
]
STRATEGY = {"ckpt-format1": "ddp", "ckpt-format2-ddp": "ddp", "ckpt-format2-fsdp": "fsdp"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, str]:
    """params_sha256 of the uninterrupted 32-step run, per strategy (one launch each, shared)."""
    hashes = {}
    for strategy in ("ddp", "fsdp"):
        run = tmp_path_factory.mktemp(f"straight-{strategy}")
        run_train([*ARGS, "--dist.strategy", strategy, "--run.dir", str(run)], nproc=2)
        summary = read_summary(run)
        assert summary["optimizer_steps"] == 32
        hashes[strategy] = summary["params_sha256"]
    return hashes


@pytest.mark.slow
@pytest.mark.parametrize("fixture", sorted(STRATEGY))
def test_a_committed_checkpoint_resumes_bit_exact(fixture, straight, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(REPO / "tests" / "fixtures" / fixture, old)
    manifest = json.loads((old / "checkpoints" / "step-000000024" / ck.MANIFEST).read_text())
    assert manifest.get("format", 1) == (1 if fixture == "ckpt-format1" else 2)
    out = run_train([*ARGS, "--dist.strategy", STRATEGY[fixture], "--run.dir", str(old)], nproc=2)
    assert "resumed from" in out.stdout and "step-000000024" in out.stdout
    resumed = read_summary(old)
    assert resumed["optimizer_steps"] == 32
    assert resumed["params_sha256"] == straight[STRATEGY[fixture]]
