"""Collectives on real gloo ranks, no-ops in one process, teardown on error."""

from __future__ import annotations

import torch
import torch.distributed as tdist

from distrib.runtime import collectives as coll
from distrib.runtime import group as dist
from tests.helpers import spawn


def _collectives(rank: int, world: int) -> dict:
    with dist.distributed(device="cpu") as rt:
        t = torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64)
        coll.all_reduce_sum(t)
        gathered = coll.all_gather_object({"rank": rank})
        obj = coll.broadcast_object(f"from{rank}")
        coll.barrier()
        return {"backend": rt.backend, "sum": t.tolist(), "gathered": gathered, "obj": obj, "world": rt.world_size}


def test_collectives_on_two_gloo_ranks(tmp_path):
    results = spawn(_collectives, 2, tmp_path)
    for r in results:
        assert r["backend"] == "gloo" and r["world"] == 2
        assert r["sum"] == [3.0, 10.0]
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}] and r["obj"] == "from0"


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
