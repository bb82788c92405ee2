"""FSDP2 (`dist.strategy=fsdp`) on real gloo ranks and real torchrun: the same numbers as DDP, one
reduction per optimizer step, sharded checkpoints that resume bit-exact or at another world size,
and the memory it saves, counted."""

from __future__ import annotations

import pytest
from torch import nn

from distrib.cli.task import TaskConfig, make_model
from distrib.errors import ConfigError
from distrib.parallel.fsdp import find_blocks

# ----------------------------------------------------------------------------- in-process ranks


# ----------------------------------------------------------------------------- configuration


def test_blocks_are_the_repeated_children_of_containers_or_the_named_classes():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    assert [type(b).__name__ for b in find_blocks(gpt2)] == ["GPT2Block"] * 3
    assert find_blocks(gpt2, ["GPT2Block"]) == list(gpt2.transformer.h)
    mlp = make_model(TaskConfig(depth=2), seed=0)
    assert find_blocks(mlp) == [mlp[0], mlp[2], mlp[4]]
    assert find_blocks(nn.Linear(2, 2)) == []  # nothing repeated: the root alone is sharded
    with pytest.raises(ConfigError, match=r"dist.fsdp_blocks=Nope matches no submodule .* found automatically first: GPT2Block, "):
        find_blocks(gpt2, ["Nope"])


def test_hsdp_mesh_shards_within_groups_of_consecutive_ranks_and_says_so():
    from distrib.parallel.fsdp import describe_mesh, mesh_shape

    assert mesh_shape(8) == (8,) and mesh_shape(8, 2) == (2, 4) and mesh_shape(4, 4) == (4, 1)
    with pytest.raises(ConfigError, match=r"dist.replicate=3 does not divide the world size 4.*HINT: pass --dist.replicate 1, 2, 4 \(a divisor of 4"):
        mesh_shape(4, 3)
    assert describe_mesh(4).startswith("FSDP over all 4 ranks")
    line = describe_mesh(16, 2, local_world_size=8)
    assert "HSDP 2 x 8" in line and "ranks 0-7, 8-15 each hold one sharded copy (each within one node)" in line
    assert "groups span nodes" in describe_mesh(16, 1 * 2, local_world_size=4)


def test_replicate_and_offload_need_fsdp_and_offload_needs_ranks():
    from distrib.config import Config, DistConfig
    from distrib.parallel.fsdp import sharded_layout

    with pytest.raises(ConfigError, match=r"dist.replicate=2 applies to sharded training, but dist.strategy=ddp.*HINT: pass --dist.strategy fsdp"):
        Config().replace(**{"dist.replicate": 2})
    with pytest.raises(ConfigError, match=r"dist.fsdp_offload=true applies to sharded training.*or drop --dist.fsdp_offload"):
        Config().replace(**{"dist.fsdp_offload": True})
    with pytest.raises(ConfigError, match="dist.replicate=0 must be > 0"):
        Config().replace(**{"dist.replicate": 0, "dist.strategy": "fsdp"})
    with pytest.raises(ConfigError, match=r"dist.fsdp_offload=true in one process.*torchrun --nproc_per_node=N"):
        sharded_layout(DistConfig(strategy="fsdp", fsdp_offload=True), 1)
    with pytest.raises(ConfigError, match="dist.replicate=2 does not divide the world size 1"):
        sharded_layout(DistConfig(strategy="fsdp", replicate=2), 1)
    assert sharded_layout(DistConfig(strategy="fsdp", replicate=2, fsdp_offload=True), 4)
    assert not sharded_layout(DistConfig(strategy="fsdp"), 1) and not sharded_layout(DistConfig(), 4)
