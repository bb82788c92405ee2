"""Config: precedence, file formats, unknown keys, validation messages."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import textwrap

import pytest

from distrib.cli.task import SECTIONS
from distrib.config import Config, config_class, config_help
from distrib.config import parse_config as parse_core
from distrib.errors import ConfigError

# The built-in task's keys (task.*, data.train_size, optim.*) are its own sections, as for any script.
parse_config = functools.partial(parse_core, sections=SECTIONS)


def test_defaults_are_valid():
    cfg = parse_config([])
    assert cfg == config_class(SECTIONS)() and parse_core([]) == Config()
    assert cfg.train.batch_size == 64 and cfg.optim.name == "adamw" and cfg.data.train_size == 16384


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
        (["--optim.lr", "inf"], "optim.lr='inf' is not a finite number"),
        (["--train.clip_grad_norm", "nan"], "train.clip_grad_norm='nan' is not a finite number"),
        (["--dist.timeout_s", "nan"], "dist.timeout_s='nan' is not a finite number"),
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


def _load(tmp_path, name: str, text: str):
    f = tmp_path / name
    f.write_text(textwrap.dedent(text))
    return parse_config(["--config", str(f)])


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("c.yaml", "run:\n  dir: null\n", "run.dir=None in --config '{f}' is null, not a str. HINT: give run.dir a str, e.g. \"text\""),
        ("c.yaml", "run:\n  dir: [a, b]\n", "run.dir=['a', 'b'] in --config '{f}' is a list, not a str."),
        ("c.yaml", "run:\n  dir: {a: 1}\n", "'run.dir.a' sets a key inside run.dir, which is a str, not a section."),
        ("c.json", '{"run": {"dir": 5}}', "run.dir=5 in --config '{f}' is an int, not a str."),
        ("c.toml", "[run]\ndir = 1.5\n", "run.dir=1.5 in --config '{f}' is a float, not a str."),
        (
            "c.yaml",
            "wandb:\n  name: no\n",
            "wandb.name=False in --config '{f}' is a bool, not a str | none. HINT: give wandb.name a str | none, e.g. \"text\" or null (quote text",
        ),
        ("c.yaml", "wandb:\n  project: 2024-01-01\n", "is a date, not a str | none"),
        ("c.yaml", "wandb:\n  tags: [a, 1]\n", "wandb.tags=['a', 1] in --config '{f}' is a list holding an int (1), not a list[str]."),
        ("c.yaml", "wandb:\n  tags: [a, [b]]\n", "is a list holding a list (['b']), not a list[str]."),
        ("c.yaml", "wandb:\n  tags: null\n", "wandb.tags=None in --config '{f}' is null, not a list[str]."),
        ("c.yaml", "train:\n  epochs: 2.5\n", "train.epochs=2.5 in --config '{f}' is a float, not an int. HINT: give train.epochs an int, e.g. 3"),
        ("c.yaml", "train:\n  epochs: true\n", "train.epochs=True in --config '{f}' is a bool, not an int."),
        ("c.yaml", "train:\n  max_steps: [3]\n", "train.max_steps=[3] in --config '{f}' is a list, not an int | none."),
        ("c.json", '{"data": {"shuffle": 1}}', "data.shuffle=1 in --config '{f}' is an int, not a bool. HINT: give data.shuffle a bool, e.g. true"),
        ("c.yaml", "optim:\n  lr: false\n", "optim.lr=False in --config '{f}' is a bool, not a float."),
    ],
)
def test_file_values_are_checked_by_type(tmp_path, name, text, needle):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, name, text)
    assert needle.format(f=tmp_path / name) in str(err.value)


def test_file_values_of_the_right_type_load_as_before(tmp_path):
    cfg = _load(
        tmp_path,
        "c.yaml",
        """
        train: {max_steps: null, epochs: 3.0, clip_grad_norm: 1, precision: bf16}
        data: {shuffle: "off", drop_last: yes}
        wandb: {tags: [a, b], name: null}
    """,
    )
    assert (cfg.train.max_steps, cfg.train.epochs, cfg.train.clip_grad_norm, cfg.data.shuffle, cfg.data.drop_last) == (None, 3, 1.0, False, True)
    assert type(cfg.train.epochs) is int and cfg.wandb.tags == ["a", "b"] and cfg.wandb.name is None
    cfg = _load(tmp_path, "c.toml", 'train.max_steps = "none"\nwandb.tags = "a,b"\nwandb.name = "none"\n')  # TOML has no null
    assert (cfg.train.max_steps, cfg.wandb.tags, cfg.wandb.name) == (None, ["a", "b"], None)
    assert parse_config(["--run.dir", "none", "--wandb.tags", "a,b"]).run.dir == "none"  # flags are text, parsed as before


LAUGHS = "wandb:\n  tags:\n    - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    - &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcde", "bcdef")
)  # 9**6 items once expanded; the same shape nine deep is the 6.5 GB "billion laughs"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("wandb:\n  tags: &t [a, b]\n  name: *t\n", "uses the YAML alias *t (line 3)"),
        (LAUGHS, "uses the YAML alias *a (line 4)"),
        ("base: &base {epochs: 2}\ntrain:\n  <<: *base\n", "uses the YAML alias *base (line 3)"),
    ],
)
def test_yaml_aliases_are_refused_before_they_expand(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "c.yaml", text)
    assert f"--config '{tmp_path / 'c.yaml'}' {needle}" in str(err.value) and "HINT: write the value out in full" in str(err.value)


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("c.yaml", "train:\n  epochs: 3\n  batch_size: 4\n  epochs: 5\n", "key 'epochs' is given twice, on line 2 and line 4"),
        ("c.yaml", "train: {epochs: 1, epochs: 2}\n", "key 'epochs' is given twice, on line 1 and line 1"),
        ("c.yaml", "train:\n  epochs: 3\nseed: 1\ntrain:\n  batch_size: 4\n", "key 'train' is given twice, on line 1 and line 4"),
        ("c.json", '{"train": {"epochs": 3, "epochs": 5}}', "key 'epochs' is given twice in section 'train' (3, then 5)"),
        ("c.json", '{"seed": 1, "train": {"epochs": 3}, "seed": 2}', "key 'seed' is given twice at the top level (1, then 2)"),
        ("c.yaml", "train.epochs: 3\ntrain:\n  epochs: 5\n", "'train.epochs' is set twice (3, then 5): once as a dotted key"),
        ("c.toml", "[train]\nepochs = 3\nepochs = 5\n", "could not be parsed: Cannot overwrite a value (at line 3"),  # tomllib's own check
    ],
)
def test_repeated_keys_are_refused(tmp_path, name, text, needle):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, name, text)
    assert f"--config '{tmp_path / name}'" in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/null"])
def test_a_fifo_or_device_is_refused_without_reading_it(tmp_path, kind):
    path = tmp_path / "c.yaml" if kind == "fifo" else kind
    if kind == "fifo":
        os.mkfifo(path)

    def stuck(*_):
        raise AssertionError("reading the config blocked")

    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(10)  # a regression that opens the FIFO fails here instead of hanging the suite
    try:
        with pytest.raises(ConfigError) as err:
            parse_config(["--config", str(path)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    assert f"--config '{path}' is {what}, not a config file. HINT: write the config to a regular file" in str(err.value)


def test_replace_revalidates():
    cfg = Config().replace(**{"train.epochs": 2})
    assert cfg.train.epochs == 2
    with pytest.raises(ConfigError):
        Config().replace(**{"train.epochs": 0})


# --------------------------------------------------------------------------- a script's own config


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """A script's own section."""

    width: int = 8
    """Hidden width of the script's model."""
    act: str = "relu"
    """Activation."""

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ConfigError(f"model.width={self.width} must be >= 1. HINT: pass --model.width 8.")


def test_the_task_keys_belong_to_the_built_in_task_not_to_every_script():
    for key in ("--task.hidden", "--data.train_size", "--optim.lr"):
        with pytest.raises(ConfigError, match="Unknown config key"):
            parse_core([key, "3"])


def test_a_script_section_round_trips_through_flags_file_defaults_and_help(tmp_path):
    sections = {"model": ModelConfig}
    defaults = {"model.width": 16, "train.epochs": 9}
    cfg = parse_core([], sections=sections, defaults=defaults)
    assert (cfg.model.width, cfg.model.act, cfg.train.epochs) == (16, "relu", 9)  # the script's defaults win over the fields'
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  width: 32\n  act: gelu\ntrain:\n  epochs: 4\n")
    cfg = parse_core(["--config", str(f), "--model.width", "64"], sections=sections, defaults=defaults)
    assert (cfg.model.width, cfg.model.act, cfg.train.epochs) == (64, "gelu", 4)  # defaults < file < flags
    assert cfg.to_dict()["model"] == {"width": 64, "act": "gelu"}
    assert cfg.replace(**{"model.act": "tanh"}).model.act == "tanh"
    with pytest.raises(ConfigError, match="model.width=0 must be >= 1"):
        parse_core(["--model.width", "0"], sections=sections)
    with pytest.raises(ConfigError, match="Did you mean 'model.width'"):
        parse_core(["--model.widht", "3"], sections=sections)
    text = config_help(config_class(sections), prog="train.py", defaults=defaults)
    assert "--model.width INT  (default: 16)" in text and "Hidden width of the script's model." in text
    assert "--train.epochs INT  (default: 9)" in text and "--train.batch_size INT  (default: 64)" in text
    assert "--data.train_size" not in text  # the built-in task's key, not this script's


def test_a_section_may_extend_distribs_own_but_not_replace_it():
    from distrib.cli.task import TaskDataConfig

    assert parse_core(["--data.train_size", "7"], sections={"data": TaskDataConfig}).data.train_size == 7
    with pytest.raises(ConfigError, match="must subclass distrib's DataConfig"):
        config_class({"data": ModelConfig})
    with pytest.raises(ConfigError, match="replace distrib's top-level key 'seed'"):
        config_class({"seed": ModelConfig})
