"""`distrib export --format safetensors|hf`: a checkpoint's model as safetensors (sharded above a size,
with the index), read back bitwise by the safetensors library and by from_pretrained; refusals before
anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distrib import Config, Session
from distrib.checkpoint.export import model_state, resolve
from distrib.cli.export import main, parse_size
from tests.helpers import REPO

FIXTURES = REPO / "tests" / "fixtures"


@pytest.mark.parametrize("fixture", ["ckpt-format2-ddp", "ckpt-format2-fsdp"])
def test_a_checkpoint_exports_to_sharded_safetensors_with_an_index(tmp_path, fixture, capsys):
    expected = model_state(resolve(FIXTURES / fixture))
    assert main([str(FIXTURES / fixture), "--format", "safetensors", "--out", str(tmp_path / "st"), "--max-shard-size", "2KB"]) == 0
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0].startswith("model-00001-of-")
    got = {k: v for f in files for k, v in load_file(tmp_path / "st" / f).items()}
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in expected.values())
    # One file when the model fits under the limit.
    assert main([str(FIXTURES / fixture), "--format", "safetensors", "--out", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]


def test_hf_format_writes_config_json_and_from_pretrained_gives_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.unit.checkpoint.test_weights import gpt2_config

    cfg = Config().replace(**{"run.dir": str(tmp_path / "run"), "run.device": "cpu", "wandb.mode": "disabled"})
    torch.manual_seed(0)
    with Session(cfg) as session:
        model = session.setup(transformers.GPT2LMHeadModel(gpt2_config()))
        session.save({"model": model}, step=1)
        session.wait_for_save()
    assert main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf"), "--max-shard-size", "30KB"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    batch = torch.arange(12).reshape(2, 6)
    assert torch.equal(loaded(batch).logits, model.eval()(batch).logits)


def test_refusals_name_the_fix_and_write_nothing(tmp_path, capsys):
    fixture = str(FIXTURES / "ckpt-format2-ddp")
    assert main([fixture, "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "did not record one" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    assert main([fixture, "--format", "safetensors", "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in (tmp_path / "full").iterdir()) == ["mine.txt"]
    assert main([fixture, "--format", "safetensors", "--out", str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
    assert "is not a size" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_sizes_read_as_people_write_them():
    assert parse_size("5GB") == 5 * 2**30 and parse_size("500MB") == 500 * 2**20 and parse_size("2GiB") == 2 * 2**30 and parse_size("1024") == 1024
