"""Config: precedence, file formats, unknown keys, validation messages."""

from __future__ import annotations

import pytest

from distrib.config import Config, parse_config
from distrib.errors import ConfigError


def test_defaults_are_valid():
    cfg = parse_config([])
    assert cfg == Config()
    assert cfg.train.batch_size == 64 and cfg.optim.name == "adamw"


def test_flags_override_file_override_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('seed = 5\n[train]\nbatch_size = 16\nepochs = 3\n[optim]\nname = "sgd"\n')
    cfg = parse_config(["--config", str(f), "--train.epochs", "7", "--optim.lr=0.5"])
    assert (cfg.seed, cfg.train.batch_size, cfg.train.epochs, cfg.optim.name, cfg.optim.lr) == (5, 16, 7, "sgd", 0.5)
    assert cfg.train.grad_accum == 1  # untouched default


def test_yaml_file_and_dotted_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task:\n  hidden: 32\ntrain.max_steps: 9\ndata:\n  drop_last: true\n")
    cfg = parse_config(["--config", str(f)])
    assert (cfg.task.hidden, cfg.train.max_steps, cfg.data.drop_last) == (32, 9, True)


def test_bool_flags_and_none():
    cfg = parse_config(["--debug", "--data.shuffle", "false", "--train.max_steps", "none", "--train.compile"])
    assert cfg.debug is True and cfg.data.shuffle is False and cfg.train.max_steps is None and cfg.train.compile


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--train.batchsize", "3"], "Did you mean 'train.batch_size'"),
        (["--optim.learning_rate", "3"], "Unknown config key 'optim.learning_rate'"),
        (["--train.batch_size", "0"], "train.batch_size=0 must be > 0"),
        (["--data.train_size", "-5"], "data.train_size=-5 must be > 0"),
        (["--data.eval_size", "0"], "data.eval_size=0 must be > 0"),
        (["--train.grad_accum", "0"], "train.grad_accum=0 must be > 0"),
        (["--task.classes", "1"], "task.classes=1 must be >= 2"),
        (["--train.precision", "fp8"], "train.precision='fp8' is not one of fp32, bf16, fp16"),
        (["--optim.name", "lamb"], "optim.name='lamb' is not one of sgd, adamw"),
        (["--train.batch_size", "abc"], "train.batch_size='abc' is not a valid int"),
        (["--data.persistent_workers"], "needs data.num_workers > 0"),
        (["--train.epochs"], "--train.epochs needs a value"),
        (["train.epochs=3"], "Unexpected argument"),
    ],
)
def test_bad_input_names_field_and_fix(argv, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert needle in str(err.value)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nepoch = 3\n")
    with pytest.raises(ConfigError, match="Unknown config key 'train.epoch'. Did you mean 'train.epochs'"):
        parse_config(["--config", str(f)])


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        parse_config(["--config", str(tmp_path / "nope.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="could not be parsed"):
        parse_config(["--config", str(bad)])


def test_replace_revalidates():
    cfg = Config().replace(**{"train.epochs": 2})
    assert cfg.train.epochs == 2
    with pytest.raises(ConfigError):
        Config().replace(**{"train.epochs": 0})
