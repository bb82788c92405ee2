"""Typed config: keyword-only dataclasses, one per section, validated in `__post_init__`.

Reading argv and config files into a Config, and `--help`, live in `distrib/argv.py`.

Precedence: field defaults < config file (TOML, YAML or JSON) < `--section.key value` flags.
Unknown keys are an error that names the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import os
import reprlib
import types
import typing
from typing import Any, Mapping, Sequence

from distrib.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
STRATEGIES = ("ddp", "fsdp")
INT_LIMIT = 10**15
MAX_WORKERS = 256


def _positive(section: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            fix = "1 or larger" if isinstance(value, int) else "a value above 0 (e.g. 0.1)"
            raise ConfigError(f"{section}.{name}={value} must be > 0. HINT: pass --{section}.{name} {fix}.")


def _non_negative(section: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value < 0:
            raise ConfigError(f"{section}.{name}={value} must be >= 0. HINT: pass --{section}.{name} 0 or larger.")


def _one_of(section: str, name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value).lower(), choices, n=1, cutoff=0.5)  # `FSDP` -> fsdp
        raise ConfigError(f"{section}.{name}={value!r} is not one of {', '.join(choices)}. HINT: pass --{section}.{name} {(near or choices)[0]}.")


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/distrib"
    """Directory rank 0 writes metrics, config, model and summary into."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""

    def __post_init__(self) -> None:
        if not self.dir:
            raise ConfigError("run.dir is empty. HINT: pass --run.dir runs/my-run.")
        _one_of("run", "device", self.device, DEVICES)


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    num_workers: int = 0
    """DataLoader worker processes per rank (0 loads in the main process)."""
    persistent_workers: bool = False
    """Keep workers alive across epochs (needs num_workers > 0)."""
    prefetch_factor: int | None = None
    """Batches each worker loads ahead (needs num_workers > 0); None keeps PyTorch's default."""
    shuffle: bool = True
    """Shuffle the training set each epoch (seeded by `seed` and the epoch)."""
    drop_last: bool = False
    """Drop the incomplete last global batch of each epoch instead of training on it."""
    prefetch: bool = True
    """On CUDA, copy batch n+1 on a side stream while batch n computes."""

    def __post_init__(self) -> None:
        _positive("data", prefetch_factor=self.prefetch_factor)
        _non_negative("data", num_workers=self.num_workers)
        if self.num_workers > MAX_WORKERS:  # each is a process with a copy of the dataset object
            raise ConfigError(f"data.num_workers={self.num_workers} is more processes than any machine uses well (at most {MAX_WORKERS}). "
                              f"HINT: a few per CPU core and rank: pass --data.num_workers {min(os.cpu_count() or 2, 8)}.")
        if self.num_workers == 0 and self.persistent_workers:
            raise ConfigError("data.persistent_workers=true needs data.num_workers > 0. HINT: pass --data.num_workers 2 or drop the flag.")
        if self.num_workers == 0 and self.prefetch_factor is not None:
            raise ConfigError("data.prefetch_factor is set but data.num_workers=0. HINT: pass --data.num_workers 2 or unset prefetch_factor.")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    batch_size: int = 64
    """Samples per process per micro-batch (the global batch is batch_size * world_size * grad_accum)."""
    eval_batch_size: int | None = None
    """Samples per process per evaluation batch; defaults to batch_size."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; gradients are all-reduced once per step."""
    epochs: int = 4
    """Passes over the training set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run all epochs)."""
    log_every: int = 50
    """Optimizer steps between logged (all-reduced) training metrics."""
    precision: str = "fp32"
    """`fp32`, `bf16` (autocast) or `fp16` (autocast + GradScaler)."""
    clip_grad_norm: float | None = None
    """Clip the global gradient norm to this value (after unscaling); None disables."""
    compile: bool = False
    """Wrap the model with torch.compile."""
    debug_steps: int = 10
    """Optimizer-step limit in --debug mode."""
    straggler_threshold: float = 0.3
    """Warn when (slowest - fastest) / slowest rank step time passes this for 3 log intervals in a row,
    by at least 5 ms a step (shorter spreads are a busy machine's noise, not a slow rank)."""
    hang_timeout_s: float | None = 300.0
    """Dump every rank's Python stacks when no step completes for this long; None disables."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device, for MFU (needs the task's FLOPs per sample); None: no MFU."""
    progress: str = "auto"
    """`auto` (a progress bar when stdout is a terminal, else one line per log interval), `bar`, `lines`."""

    def __post_init__(self) -> None:
        _one_of("train", "progress", self.progress, ("auto", "bar", "lines"))
        _positive("train", straggler_threshold=self.straggler_threshold, hang_timeout_s=self.hang_timeout_s, peak_flops=self.peak_flops)
        _positive(
            "train",
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            grad_accum=self.grad_accum,
            epochs=self.epochs,
            max_steps=self.max_steps,
            log_every=self.log_every,
            clip_grad_norm=self.clip_grad_norm,
            debug_steps=self.debug_steps,
        )
        _one_of("train", "precision", self.precision, PRECISIONS)


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """`sgd` or `adamw`."""
    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    momentum: float = 0.0
    """SGD momentum."""
    schedule: str = "cosine"
    """`constant`, `cosine` or `linear` decay over the run's optimizer steps."""
    warmup_steps: int = 0
    """Linear warm-up optimizer steps before the schedule."""

    def __post_init__(self) -> None:
        _one_of("optim", "name", self.name, OPTIMIZERS)
        _one_of("optim", "schedule", self.schedule, SCHEDULES)
        _positive("optim", lr=self.lr)
        _non_negative("optim", weight_decay=self.weight_decay, momentum=self.momentum, warmup_steps=self.warmup_steps)


@dataclasses.dataclass(kw_only=True)
class DistConfig:
    strategy: str = "ddp"
    """`ddp`: every rank holds the whole model, gradients and optimizer state. `fsdp`: FSDP2 shards
    them across ranks (each holds about 1/world_size), at the cost of gathering parameters in each
    forward and backward: pick it when the model and its optimizer state do not fit one device."""
    fsdp_blocks: list[str] = dataclasses.field(default_factory=list)
    """FSDP: class names of the blocks to shard one by one (e.g. `GPT2Block`); empty: found automatically
    (the repeated children of an `nn.ModuleList`/`nn.Sequential`, e.g. a transformer's layers)."""
    reshard_after_forward: bool = True
    """FSDP: free each block's gathered parameters after its forward (less memory) and gather them again
    for backward (one more all-gather per block)."""
    backend: str = "auto"
    """`auto` (NCCL on CUDA, gloo on CPU), `gloo` or `nccl`."""
    timeout_s: float = 600.0
    """Collective timeout: a rank waiting longer than this on a dead peer fails instead of hanging."""
    find_unused_parameters: bool = False
    """DDP: tolerate parameters that get no gradient in a step (costs a graph traversal)."""
    static_graph: bool = False
    """DDP: the set of used parameters never changes between steps."""
    gradient_as_bucket_view: bool = False
    """DDP: gradients alias the all-reduce buckets (saves one copy of the gradients)."""
    bucket_cap_mb: float | None = None
    """DDP: all-reduce bucket size in MiB. `none`: DDP's own default (25 MiB, with a small 1 MiB first
    bucket so the all-reduce starts early in backward; passing 25 explicitly loses that first bucket)."""
    sync_batchnorm: bool = False
    """Convert BatchNorm layers to SyncBatchNorm when there is more than one process."""

    def __post_init__(self) -> None:
        _one_of("dist", "backend", self.backend, BACKENDS)
        _one_of("dist", "strategy", self.strategy, STRATEGIES)
        _positive("dist", timeout_s=self.timeout_s, bucket_cap_mb=self.bucket_cap_mb)


@dataclasses.dataclass(kw_only=True)
class CkptConfig:
    every: int | None = 100
    """Checkpoint every this many optimizer steps (and at each epoch end); None: epoch ends only."""
    keep: int = 3
    """How many of the newest checkpoints to keep."""
    resume: str = "auto"
    """`auto` (newest good checkpoint in run.dir, else fresh), `never`, or a checkpoint directory."""
    async_: bool = True
    """`--ckpt.async`: the step waits only for a host copy of the state; writing, fsync and the commit
    run in the background (one save in flight). `false`: every rank waits for the whole save."""

    def __post_init__(self) -> None:
        _positive("ckpt", every=self.every, keep=self.keep)
        if not self.resume:
            raise ConfigError("ckpt.resume is empty. HINT: pass --ckpt.resume auto, never, or a checkpoint directory.")


WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclasses.dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases on rank 0. A key left unset defers to wandb's own environment variables."""

    mode: str | None = None
    """`auto`: online when credentials are configured (WANDB_API_KEY or netrc), else offline; never a prompt.
    `online`, `offline`, `disabled`. None: WANDB_MODE, or `disabled` under WANDB_DISABLED=true, else `auto`."""
    project: str | None = None
    """None: WANDB_PROJECT, else `distrib`."""
    name: str | None = None
    """Run name; None: WANDB_NAME, else wandb picks one."""
    tags: list[str] = dataclasses.field(default_factory=list)
    """Comma-separated on the command line: --wandb.tags a,b. Empty: WANDB_TAGS."""
    group: str | None = None
    """None: WANDB_RUN_GROUP, else the Slurm job id when there is one."""
    init_timeout_s: float = 60.0
    """How long wandb.init may take (in the background: training does not wait) before distrib gives up on wandb."""

    def __post_init__(self) -> None:
        if self.mode is not None:
            _one_of("wandb", "mode", self.mode, WANDB_MODES)
        _positive("wandb", init_timeout_s=self.init_timeout_s)


@dataclasses.dataclass(kw_only=True)
class Config:
    """distrib's own keys. A script adds its sections with `config_class(sections)` (or `sections=` to
    `parse_config`/`main`); the built-in task is such a script (`distrib.task.SECTIONS`)."""

    seed: int = 0
    """Seeds shuffling, dropout and whatever the script seeds from it."""
    debug: bool = False
    """Single process, no process group, num_workers=0, anomaly detection, deterministic kernels."""
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    dist: DistConfig = dataclasses.field(default_factory=DistConfig)
    ckpt: CkptConfig = dataclasses.field(default_factory=CkptConfig)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts, keyed as on the command line (`ckpt.async`, not the attribute `async_`)."""
        return _as_dict(self)

    def replace(self, **dotted: Any) -> "Config":
        """A copy with dotted keys replaced (`cfg.replace(**{"train.epochs": 1})`), re-validated."""
        cls = type(self)
        flat = flatten(self.to_dict())
        for key, value in dotted.items():
            _check_key(key, cls)
            flat[key] = value
        return from_flat(flat, cls)


# --------------------------------------------------------------------------- a script's own sections

_CLASSES: dict[tuple[tuple[str, type], ...], type] = {}


def config_class(sections: Mapping[str, type] | None = None) -> type[Config]:
    """`Config` plus a script's own sections: `{"model": ModelConfig}` adds `--model.*` keys.

    A section named like one of distrib's (`data`, `train`, ...) must subclass distrib's dataclass
    for it and so extends it (the built-in task adds `data.train_size` this way). The same sections
    give the same class, so configs built from them compare equal.
    """
    if not sections:
        return Config
    key = tuple(sorted(sections.items(), key=lambda kv: kv[0]))
    if key in _CLASSES:
        return _CLASSES[key]
    core = _field_types(Config)
    fields: list[tuple[str, type, Any]] = []
    for name, cls in key:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ConfigError(f"section {name!r} must be a dataclass type, got {cls!r}. HINT: decorate it with @dataclasses.dataclass(kw_only=True).")
        if not name.isidentifier():
            raise ConfigError(f"section name {name!r} is not an identifier. HINT: use a name like 'model'.")
        if name in core and not dataclasses.is_dataclass(core[name]):
            raise ConfigError(f"section {name!r} would replace distrib's top-level key {name!r}. HINT: choose another section name.")
        if name in core and not issubclass(cls, core[name]):
            raise ConfigError(
                f"section {name!r} is distrib's own; {cls.__name__} must subclass distrib's {core[name].__name__} to "
                f"extend it. HINT: class {cls.__name__}(distrib.config.{core[name].__name__}): ... or choose another section name."
            )
        fields.append((name, cls, dataclasses.field(default_factory=cls)))
    made = dataclasses.make_dataclass("ScriptConfig", fields, bases=(Config,), kw_only=True)
    made.__module__ = __name__
    _CLASSES[key] = made
    return made


# --------------------------------------------------------------------------- parsing


def _key(attr: str) -> str:
    """A field's config key: a Python keyword can only be an attribute with a trailing `_` (`async_` is `async`)."""
    return attr[:-1] if attr.endswith("_") and keyword.iskeyword(attr[:-1]) else attr


def _attr(key: str) -> str:
    return f"{key}_" if keyword.iskeyword(key) else key


def _as_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {_key(f.name): _as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_as_dict(v) for v in obj]
    return obj


def _field_types(cls: type) -> dict[str, Any]:
    """Config key -> type of each field of dataclass `cls`."""
    return {_key(f.name): hints[f.name] for hints in [typing.get_type_hints(cls)] for f in dataclasses.fields(cls)}


def _schema(cls: type = Config) -> dict[str, Any]:
    """Dotted key -> type, for every leaf field."""
    schema: dict[str, Any] = {}
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            for sub, subtp in _field_types(tp).items():
                schema[f"{name}.{sub}"] = subtp
        else:
            schema[name] = tp
    return schema


def _check_key(key: str, cls: type = Config) -> None:
    schema = _schema(cls)
    if key not in schema:
        parts = key.split(".")
        for leaf in (".".join(parts[:i]) for i in range(1, len(parts))):
            if leaf in schema:  # a file's mapping where a value belongs: `dir: {a: 1}` flattens to run.dir.a
                name = _type_name(schema[leaf])
                raise ConfigError(f"{key!r} sets a key inside {leaf}, which is {_a(name)}, not a section. "
                                  f"HINT: give {leaf} itself {_a(name)}, e.g. --{leaf} <{name}>.")
        section = [k for k in schema if k.startswith(key + ".")]
        if section:
            raise ConfigError(f"{key!r} is a section, not a value: it holds {', '.join(section[:3])}, ... HINT: give its keys, e.g. "
                              f"`[{key}]` with `{section[0].split('.', 1)[1]} = ...` in TOML, or --{section[0]} on the command line.")
        close = difflib.get_close_matches(key, schema.keys(), n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown config key {key!r}.{hint} HINT: `--help` lists every key; valid keys are {', '.join(sorted(schema))}.")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted keys. A file may spell a key both ways (`train.epochs: 3` and `epochs`
    under `train:`); that is an error, not one value silently kept."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        items = flatten(value, dotted + ".") if isinstance(value, dict) else {dotted: value}
        for name, leaf in items.items():
            if name in flat:
                raise ConfigError(f"{name!r} is set twice ({_short(flat[name])}, then {_short(leaf)}): once as a dotted key, once inside "
                                  "its section. HINT: keep one of them.")
            flat[name] = leaf
    return flat


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 40
_SHORT.maxlist = _SHORT.maxdict = 4
_SHORT.maxlevel = 2


def _short(value: Any) -> str:
    """`repr(value)`, shortened: a message quotes what was given, never a whole (possibly huge) value."""
    return _SHORT.repr(value)


def _kind(value: Any) -> str:
    """What a config file's parser made of a value, in the files' own words (`null`, not `NoneType`)."""
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping"}
    name = names.get(type(value), type(value).__name__)  # e.g. YAML's unquoted 2024-01-01 is a date
    return name if value is None else _a(name)


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _fits(value: Any, tp: Any) -> bool:
    """Whether a config file's (already typed) value has field type `tp`; a str is left to `_coerce`."""
    if isinstance(value, str):
        return True  # parsed as the same text given as a flag (TOML has no null: "none" unsets an optional key)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(value is None if arg is type(None) else _fits(value, arg) for arg in typing.get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_fits(item, typing.get_args(tp)[0]) for item in value)
    if tp is str:
        return False  # str(None) would make run.dir "None", str([...]) a list's repr
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True  # a type distrib does not know (a script's own): the script's dataclass checks it


def _example(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _example(arg) for arg in typing.get_args(tp))
    if origin is list:
        return f"[{_example(typing.get_args(tp)[0])}, ...]"
    return {str: '"text"', int: "3", float: "0.5", bool: "true"}.get(tp, _type_name(tp))


def check_file_value(key: str, value: Any, tp: Any, source: str) -> None:
    """Refuse a config file's value whose type is not field type `tp` (`source` names the file).

    A flag is text, parsed by type in `_coerce`; a file's value arrives typed, and `str()`/`int()` would
    paper over a mismatch: `dir: null` would train into ./None, `[a, b]` into "['a', 'b']".
    """
    if _fits(value, tp):
        return
    name, given = _type_name(tp), _kind(value)
    list_tp = next((arg for arg in (tp, *typing.get_args(tp)) if typing.get_origin(arg) is list), None)
    if list_tp is not None and isinstance(value, list):  # name the item that does not fit, not just "a list"
        bad = next(item for item in value if not _fits(item, typing.get_args(list_tp)[0]))
        given = f"a list holding {_kind(bad)} ({_short(bad)})"
    quote = " (quote text: unquoted, YAML reads null, no, 1.0 or 2024-01-01 as other types)" if "str" in name else ""
    raise ConfigError(f"{key}={_short(value)} in {source} is {given}, not {_a(name)}. "
                      f"HINT: give {key} {_a(name)}, e.g. {_example(tp)}{quote}, or delete it to keep the default.")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Turn a flag string or file value into the field's type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item,) = typing.get_args(tp)
        items = value.split(",") if isinstance(value, str) else list(value)
        return [_coerce(key, v.strip() if isinstance(v, str) else v, item) for v in items if v != ""]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value)
            if abs(number) > INT_LIMIT:  # beyond what torch, itertools and the OS take: a typo, never a setting
                raise ConfigError(f"{key}={value!r} is out of range. HINT: pass --{key} with an integer below {INT_LIMIT:.0e}.")
            return number
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # nan passes every range check; inf is no setting either
                raise ConfigError(f"{key}={value!r} is not a finite number. HINT: pass --{key} with a finite value, or none where the key allows it.")
            return number
        if tp is str:
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {_type_name(tp)}. HINT: pass --{key} <{_type_name(tp)}>.") from None
    return value


def from_flat(flat: dict[str, Any], cls: type[Config] = Config) -> Config:
    """Build a validated config of class `cls` from dotted keys (unknown keys are an error)."""
    schema = _schema(cls)
    for key in flat:
        _check_key(key, cls)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in flat.items():
        value = _coerce(key, value, schema[key])
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
        else:
            top[key] = value
    types_ = _field_types(cls)
    try:
        built = {name: types_[name](**{_attr(k): v for k, v in values.items()}) for name, values in sections.items()}
    except TypeError as exc:  # a script section's own __init__ rejecting a value
        raise ConfigError(f"{exc}. HINT: check the keys of your script's section.") from None
    return cls(**top, **built)
