"""Configuration: keyword-only dataclasses, one per section, validated as they are built
(`schema.py`), and the one parser that fills them from defaults, a config file and
`--section.key value` flags, with `--help` generated from the fields' docstrings (`parse.py`);
config files (`files.py`); dotted keys and their types (`keys.py`).

Imports: `distrib.errors` only. Every other layer may import this one.
`distrib.config.<Section>Config` is public: the names below are the package's interface.
"""

from distrib.config.files import load_file
from distrib.config.keys import flatten, from_flat
from distrib.config.parse import config_help, field_docs, parse_config, parse_flags
from distrib.config.schema import (
    BACKENDS,
    DEVICES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    STRATEGIES,
    WANDB_MODES,
    CkptConfig,
    Config,
    DataConfig,
    DistConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    WandbConfig,
    config_class,
)

__all__ = [
    "BACKENDS",
    "DEVICES",
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULES",
    "STRATEGIES",
    "WANDB_MODES",
    "CkptConfig",
    "Config",
    "DataConfig",
    "DistConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "WandbConfig",
    "config_class",
    "config_help",
    "field_docs",
    "flatten",
    "from_flat",
    "load_file",
    "parse_config",
    "parse_flags",
]
