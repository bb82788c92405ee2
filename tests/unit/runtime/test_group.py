"""Collectives on real gloo ranks, no-ops in one process, teardown on error."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist

from distrib.runtime import group as dist
from distrib.runtime.env import DistEnv
from tests.helpers import spawn


def _collectives(rank: int, world: int) -> dict:
    with dist.distributed(device="cpu") as rt:
        t = torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64)
        dist.all_reduce_sum(t)
        m = dist.all_reduce_max(torch.tensor([float(rank)]))
        gathered = dist.all_gather_object({"rank": rank})
        obj = dist.broadcast_object(f"from{rank}")
        dist.barrier()
        return {"backend": rt.backend, "sum": t.tolist(), "max": m.item(), "gathered": gathered, "obj": obj, "world": rt.world_size}


def test_collectives_on_two_gloo_ranks(tmp_path):
    results = spawn(_collectives, 2, tmp_path)
    for r in results:
        assert r["backend"] == "gloo" and r["world"] == 2
        assert r["sum"] == [3.0, 10.0] and r["max"] == 1.0
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}] and r["obj"] == "from0"


def test_single_process_has_no_group_and_collectives_are_noops():
    with dist.distributed(device="cpu", denv=DistEnv()) as rt:
        assert rt.backend is None and not tdist.is_initialized()
        t = torch.tensor([2.0])
        assert dist.all_reduce_sum(t) is t and t.item() == 2.0
        assert dist.all_gather_object(5) == [5] and dist.broadcast_object(6) == 6
        dist.barrier()


def _teardown_on_error(rank: int, world: int) -> bool:
    try:
        with dist.distributed(device="cpu"):
            assert tdist.is_initialized()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    return tdist.is_initialized()


def test_process_group_is_destroyed_on_error(tmp_path):
    assert spawn(_teardown_on_error, 2, tmp_path) == [False, False]


def test_debug_refuses_a_multi_process_launch():
    with pytest.raises(dist.EnvironmentConfigError, match="--debug runs one process.*launch/debug.sh"):
        with dist.distributed(device="cpu", single=True, denv=DistEnv(world_size=2, launcher="torchrun")):
            pass


def test_nccl_on_cpu_is_explained():
    with pytest.raises(dist.ConfigError, match="dist.backend='nccl' needs CUDA"):
        dist.pick_backend("nccl", torch.device("cpu"))
