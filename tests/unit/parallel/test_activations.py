"""Activation checkpointing (`train.activation_checkpointing`): the same numbers with dropout on, and the
activation bytes each mode keeps, counted. One process; the 2-rank runs are in tests/e2e/parallel/test_memory.py."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from distrib import distributed
from distrib.config import Config, DistConfig
from distrib.errors import ConfigError
from distrib.observe.activations import ActivationBytes
from distrib.parallel import activations, fsdp
from distrib.parallel.wrap import params_sha256, wrap_model
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "examples"))
from gpt import GPT, GPTConfig  # noqa: E402  (the example is a script, not a package)

CFG = GPTConfig(dropout=0.1, layers=3, dim=32, heads=4, context=64)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (4, CFG.context), generator=g), torch.randint(0, 256, (4, CFG.context), generator=g)


def _trained(mode: str, steps: int = 3, compile_backend: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = GPT(CFG)
    activations.apply(fsdp.find_blocks(model), mode)
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1)  # dropout's stream: the same draws for every mode
    for step in range(steps):
        x, y = _batch(step)
        run(x, y)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return model


def test_full_and_selective_train_to_the_bitwise_same_parameters_with_dropout_on():
    none = _trained("none")
    assert params_sha256(none) != params_sha256(GPT(CFG))  # it trained
    assert params_sha256(_trained("full")) == params_sha256(none)
    assert params_sha256(_trained("selective")) == params_sha256(none)


def test_recompute_draws_the_same_dropout_masks_and_without_that_the_run_differs(monkeypatch):
    """The control: a recompute that does not restore the RNG state (Accelerate's) gives other numbers."""
    from torch.utils import checkpoint as ckpt

    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: real(*a, **{**k, "preserve_rng_state": False}))
    assert params_sha256(_trained("full")) != params_sha256(_trained("none"))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_composes_with_torch_compile(mode):
    eager = _trained(mode, steps=2)
    compiled = _trained(mode, steps=2, compile_backend="aot_eager")
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_full_keeps_a_quarter_or_less_of_the_activation_bytes_and_selective_keeps_matmuls():
    x, y = _batch()
    counted = {}
    for mode in activations.MODES:
        torch.manual_seed(0)
        model = GPT(CFG)
        activations.apply(fsdp.find_blocks(model), mode)
        with ActivationBytes(model) as c:
            loss = model(x, y)["loss"]
        loss.backward()  # the recompute works from what was kept
        counted[mode] = c
    none, full, selective = (counted[m].held for m in activations.MODES)
    assert abs(counted["none"].saved - none) / none < 0.01  # without checkpointing, what is held is what autograd saved
    assert full <= 0.25 * none, (full, none)
    assert full < selective < none, (full, selective, none)
    assert counted["selective"].saved == counted["full"].saved  # the saved-tensor hooks alone do not see selective's cache


def test_eval_runs_the_plain_forward_and_names_and_copies_are_the_models_own():
    model = GPT(CFG)
    plain = copy.deepcopy(model)
    activations.apply(fsdp.find_blocks(model), "full")
    assert list(model.state_dict()) == list(plain.state_dict())
    assert activations.mode_of(model) == "full" and activations.mode_of(plain) == "none"
    twin = copy.deepcopy(model)
    assert twin.blocks[0].forward.__self__ is twin.blocks[0]  # rebound to the copy, not the original
    x, _ = _batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(x)["logits"], plain.eval()(x)["logits"])


def test_a_model_without_blocks_or_with_an_instance_forward_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="found no blocks.*--dist.fsdp_blocks"):
        activations.apply(fsdp.find_blocks(nn.Linear(2, 2)), "full")
    block = nn.Linear(2, 2)
    block.forward = lambda x: x  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match="forward of its own.*activation_checkpointing none"):
        activations.apply([block], "selective")
    with pytest.raises(
        ConfigError, match="train.activation_checkpointing='ful' is not one of none, full, selective. HINT: pass --train.activation_checkpointing full"
    ):
        Config().replace(**{"train.activation_checkpointing": "ful"})


def test_wrap_model_checkpoints_the_named_blocks_under_ddp_keys_too():
    with distributed(device="cpu") as rt:
        model = wrap_model(GPT(CFG), rt, DistConfig(fsdp_blocks=["Block"]), activation_checkpointing="selective")
        assert [getattr(b, "_distrib_checkpointing", None) for b in model.blocks] == ["selective"] * CFG.layers
        with pytest.raises(ConfigError, match="dist.fsdp_blocks=Nope matches no submodule"):
            wrap_model(GPT(CFG), rt, DistConfig(fsdp_blocks=["Nope"]), activation_checkpointing="full")
