"""A meta-built model's allocation and init in one process: the values depend on the seed and the module
names only, tied parameters stay tied, and a tensor no init sets is an error naming it. (The same values
at 2 and 4 ranks, DDP and FSDP: tests/e2e/parallel/test_materialize.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrib import Config, Session
from distrib.errors import ConfigError
from distrib.parallel.fsdp import find_blocks
from distrib.parallel.materialize import is_meta, materialize
from distrib.parallel.wrap import params_sha256
from tests.meta_job import Net


def _meta(**kw) -> Net:
    with torch.device("meta"):
        return Net(**kw)


def _built(seed: int = 0, grouped: bool = True, **kw) -> Net:
    model = _meta(**kw)
    materialize(model, torch.device("cpu"), seed=seed, blocks=find_blocks(model) if grouped else [])
    return model


def test_the_values_depend_on_the_seed_and_names_not_on_how_modules_are_grouped():
    assert is_meta(_meta()) and not is_meta(_built())
    assert params_sha256(_built(grouped=True)) == params_sha256(_built(grouped=False))
    assert params_sha256(_built(seed=0)) != params_sha256(_built(seed=1))
    # A module's values do not depend on the modules around it: a deeper model starts its shared layers alike.
    shallow, deep = _built(depth=2), _built(depth=4)
    assert torch.equal(shallow.layers[1].fc.weight, deep.layers[1].fc.weight)
    # Each module drew from its own stream: two identical layers differ.
    assert not torch.equal(deep.layers[0].fc.weight, deep.layers[1].fc.weight)


def test_the_modules_own_init_is_used_and_an_init_fn_comes_first():
    model = _built()
    bound = 1 / 64**0.5  # nn.Linear's reset_parameters: uniform(-1/sqrt(fan_in), +)
    assert model.layers[0].fc.weight.abs().max() <= bound and torch.equal(model.layers[0].norm.weight, torch.ones(64))

    def ones_for_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    model = _meta()
    materialize(model, torch.device("cpu"), seed=0, init_fn=ones_for_linear)
    assert torch.equal(model.head.weight, torch.ones(50, 64))
    assert model.embed.weight.std() > 0.5  # not a Linear: its own reset_parameters (normal) filled it


def test_a_tensor_no_init_sets_is_named():
    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)), persistent=False)
            self.register_buffer("positions", torch.arange(4))

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 2), Rotary())
    with pytest.raises(ConfigError, match=r"no initialisation set 3 of its tensors: 1\.scale, 1\.inv_freq, 1\.positions\. .*HINT: give those modules"):
        materialize(model, torch.device("cpu"), seed=0)


def test_a_hugging_face_model_keeps_its_ties_and_its_scaled_init():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    materialize(model, torch.device("cpu"), seed=0, blocks=find_blocks(model))
    assert model.lm_head.weight is model.transformer.wte.weight
    std = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h]).std().item()
    assert abs(std - 0.02 / (2 * 4) ** 0.5) < 0.001, std  # GPT-2's scaled c_proj init, set by its block's init
    assert torch.isfinite(model(torch.arange(8).reshape(1, 8)).logits).all()


def test_setup_allocates_a_meta_model_and_repoints_an_optimizer_built_on_it(tmp_path):
    cfg = Config().replace(**{"run.dir": str(tmp_path / "run"), "run.device": "cpu", "seed": 3})
    model = _meta()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Session(cfg) as session:
        model, optimizer = session.setup(model, optimizer)
        assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    assert params_sha256(model) == params_sha256(_built(seed=3))


def test_fit_takes_a_meta_model_and_trains_it_as_the_same_model_allocated_first(tmp_path):
    from distrib import fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())

    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))

    def run(model: nn.Module, name: str) -> str:
        cfg = Config().replace(
            **{"run.dir": str(tmp_path / name), "run.device": "cpu", "seed": 5, "train.batch_size": 16, "train.epochs": 1, "wandb.mode": "disabled"}
        )
        return fit(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data=data)["params_sha256"]

    with torch.device("meta"):
        meta = net()
    with torch.device("meta"):
        allocated = net()
    materialize(allocated, torch.device("cpu"), seed=5)
    assert run(meta, "meta") == run(allocated, "allocated")
