"""Pretrained weights into a set-up model in one process: a sharded Hugging Face directory, a .safetensors
file, a model.pt and a run directory load bitwise; what does not fit is one error listing it; a partial
load says what stayed at init. (Each FSDP rank reading only its shards: tests/e2e/checkpoint/test_weights.py.)"""

from __future__ import annotations

import pytest
import torch

from distrib import Config, Session
from distrib.checkpoint.export import model_state
from distrib.checkpoint.store import newest_good
from distrib.checkpoint.weights import load_weights
from distrib.errors import ConfigError
from distrib.parallel.wrap import params_sha256
from tests.helpers import REPO

transformers = pytest.importorskip("transformers")


def gpt2_config(**kw):
    return transformers.GPT2Config(
        **{"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 100, "n_positions": 16, "bos_token_id": 0, "eos_token_id": 0, **kw}
    )


def saved_gpt2(path, **kw):
    """A tiny GPT-2 written by save_pretrained in several safetensors shards (with its index), and the model."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config(**kw))
    model.save_pretrained(path, max_shard_size="20KB")
    return model


def _meta_gpt2(**kw):
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(gpt2_config(**kw))


def test_a_sharded_hugging_face_directory_loads_bitwise_into_a_meta_built_model(tmp_path):
    source = saved_gpt2(tmp_path / "hf")
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").exists()
    with Session(Config().replace(**{"run.dir": str(tmp_path / "run"), "run.device": "cpu", "wandb.mode": "disabled"})) as session:
        model = session.setup(_meta_gpt2())
        done = session.load_weights(model, tmp_path / "hf")
    assert params_sha256(model) == params_sha256(source) and model.lm_head.weight is model.transformer.wte.weight
    assert done.kept == [] and done.ignored == [] and len(done.loaded) == len(source.state_dict()) - 1  # the tied head once
    assert done.bytes_read == sum(t.numel() * t.element_size() for n, t in source.state_dict().items() if n != "lm_head.weight")


def test_ckpt_init_from_loads_a_fresh_run_and_a_resumed_run_ignores_it(tmp_path):
    source = saved_gpt2(tmp_path / "hf")
    cfg = {"run.dir": str(tmp_path / "run"), "run.device": "cpu", "wandb.mode": "disabled", "ckpt.init_from": str(tmp_path / "hf")}
    with Session(Config().replace(**cfg)) as session:
        model = session.setup(_meta_gpt2())
        assert session.load({"model": model}) is None  # nothing to resume: the weights come from init_from
        session.save_model(model)
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in source.state_dict().items())


def test_a_model_pt_a_run_directory_and_a_single_safetensors_file_load_too(tmp_path):
    from safetensors.torch import save_file

    source = transformers.GPT2LMHeadModel(gpt2_config())
    torch.save(source.state_dict(), tmp_path / "model.pt")
    (tmp_path / "run").mkdir()
    torch.save(source.state_dict(), tmp_path / "run" / "model.pt")
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if k != "lm_head.weight"}, tmp_path / "w.safetensors")
    for path in (tmp_path / "model.pt", tmp_path / "run", tmp_path / "w.safetensors"):
        model = transformers.GPT2LMHeadModel(gpt2_config())
        load_weights(model, path)
        assert params_sha256(model) == params_sha256(source), path


def test_what_does_not_fit_is_one_error_listing_it_and_nothing_is_loaded(tmp_path):
    saved_gpt2(tmp_path / "hf")
    wider = transformers.GPT2LMHeadModel(gpt2_config(n_embd=64))
    before = params_sha256(wider)
    with pytest.raises(ConfigError, match=r"transformer\.wte\.weight has shape \(100, 32\) in the source and \(100, 64\) in the model") as e:
        load_weights(wider, tmp_path / "hf")
    assert "Nothing was loaded" in str(e.value) and params_sha256(wider) == before
    half = wider.half()
    with pytest.raises(ConfigError, match=r"is float32 in the source and float16 in the model"):
        load_weights(transformers.GPT2LMHeadModel(gpt2_config()).half(), tmp_path / "hf")
    del half


def test_a_partial_load_keeps_the_new_parts_at_init_and_says_which(tmp_path, caplog):
    base = transformers.GPT2Model(gpt2_config())  # no LM head, names without "transformer."
    base.save_pretrained(tmp_path / "base")
    model = transformers.GPT2ForSequenceClassification(gpt2_config(num_labels=3))
    with pytest.raises(
        ConfigError, match=r"missing from the source: transformer\.wte\.weight.*not in the model: h\.0\.attn\.c_attn\.bias.*--ckpt\.init_strict false"
    ):
        load_weights(model, tmp_path / "base")
    # The same body under the classifier's names: only the new head stays at its init.
    body = {f"transformer.{k}": v for k, v in base.state_dict().items()}
    torch.save(body, tmp_path / "body.pt")
    head = model.score.weight.clone()
    done = load_weights(model, tmp_path / "body.pt", strict=False)
    assert done.kept == ["score.weight"] and done.ignored == [] and torch.equal(model.score.weight, head)
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, base.h[1].mlp.c_fc.weight)
    assert "kept at their initialisation (not in the source): score.weight" in caplog.text


def test_a_source_that_is_not_there_or_holds_no_weights_says_what_to_pass(tmp_path):
    with pytest.raises(ConfigError, match="does not exist. HINT: pass a Hugging Face model directory"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no weights distrib can read"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "empty")


def test_a_ddp_and_an_fsdp_checkpoint_and_a_run_directory_without_model_pt_load_their_model():
    for fixture in ("ckpt-format2-ddp", "ckpt-format2-fsdp"):
        run = REPO / "tests" / "fixtures" / fixture
        found = newest_good(run / "checkpoints")
        assert found is not None
        expected = model_state(found[0])  # what `distrib export` makes of it
        for source in (found[0], run):  # the checkpoint, and the run directory standing for its newest one
            model = _model_like(expected)
            done = load_weights(model, source)
            assert done.kept == [] and all(torch.equal(model.state_dict()[k], v) for k, v in expected.items()), (fixture, source)


def _model_like(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module with `state`'s names and shapes, zero-filled (the fixtures' built-in model, whatever it is)."""
    root = torch.nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros_like(t), requires_grad=t.is_floating_point()))
    return root


def test_distrib_train_with_weights_that_do_not_fit_exits_2_naming_them_and_writes_nothing(tmp_path, capsys):
    from distrib.cli.train import main

    saved_gpt2(tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bar
    small = ["--data.train_size", "256", "--data.eval_size", "64", "--train.epochs", "1", "--wandb.mode", "disabled"]
    assert main([*small, "--ckpt.init_from", str(tmp_path / "hf"), "--run.dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distrib: error: The weights at") and "missing from the source: 0.weight, 0.bias" in err and "not in the model: " in err
    assert "transformer.wte.weight" in err and "Nothing was loaded" in err
    assert not (tmp_path / "run").exists() or not [p for p in (tmp_path / "run").iterdir() if p.name != ".lock"], list((tmp_path / "run").iterdir())
