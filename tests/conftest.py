"""Shared fixtures: one thread per rank, no leaked process group, no leaked environment variables."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as tdist

# 2 cores on the test machines: every rank (and this process) uses one thread.
torch.set_num_threads(1)


# pytest's own bookkeeping, the cache dir torch's inductor exports when first imported, the Triton
# paths inductor exports when it first compiles for CUDA, and the address of the wandb service a
# first in-process wandb.init starts (each owned by that library).
_OWNED_BY_OTHERS = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TRITON_PTXAS_PATH", "WANDB_SERVICE"}


@pytest.fixture(autouse=True)
def _no_leaks():
    before = {k: v for k, v in os.environ.items() if k not in _OWNED_BY_OTHERS}
    yield
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
        pytest.fail("the test left a process group initialized")
    after = {k: v for k, v in os.environ.items() if k not in _OWNED_BY_OTHERS}
    leaked = (set(after) ^ set(before)) | {k for k in before if after.get(k) != before[k]}
    if leaked:
        for k in set(after) - set(before):
            del os.environ[k]
        os.environ.update(before)
        pytest.fail(f"the test changed environment variables: {sorted(leaked)}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
