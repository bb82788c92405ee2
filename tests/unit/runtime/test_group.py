"""Collectives on real gloo ranks, no-ops in one process, teardown on error."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist

from distrib.runtime import collectives as coll
from distrib.runtime import group as dist
from distrib.runtime.env import DistEnv


def test_single_process_has_no_group_and_collectives_are_noops():
    with dist.distributed(device="cpu", denv=DistEnv()) as rt:
        assert rt.backend is None and not tdist.is_initialized()
        t = torch.tensor([2.0])
        assert coll.all_reduce_sum(t) is t and t.item() == 2.0
        assert coll.all_gather_object(5) == [5] and coll.broadcast_object(6) == 6
        coll.barrier()


def test_debug_refuses_a_multi_process_launch():
    with pytest.raises(dist.EnvironmentConfigError, match="--debug runs one process.*launch/debug.sh"):
        with dist.distributed(device="cpu", single=True, denv=DistEnv(world_size=2, launcher="torchrun")):
            pass


def test_nccl_on_cpu_is_explained():
    with pytest.raises(dist.ConfigError, match="dist.backend='nccl' needs CUDA"):
        dist.pick_backend("nccl", torch.device("cpu"))


def test_a_launch_without_master_addr_is_told_to_set_it_not_to_check_reachability():
    torch_says = ValueError("Error initializing torch.distributed using env:// rendezvous: environment variable MASTER_ADDR expected, but not set")
    error = dist._rendezvous_error(torch_says, DistEnv(rank=1, world_size=2, launcher="torchrun"), 600.0)
    assert "HINT: MASTER_ADDR is not set: export MASTER_ADDR=<rank 0's host> and MASTER_PORT=<a free port>" in str(error), error
    assert "reachable" not in str(error)
