"""Dotted config keys and their values: the schema of a config class, unknown-key errors that name
the nearest key, and turning a flag's text or a file's value into a field's type."""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import reprlib
import types
import typing
from typing import TYPE_CHECKING, Any

from distrib.errors import ConfigError

if TYPE_CHECKING:
    from distrib.config.schema import Config

INT_LIMIT = 10**15


def key_of(attr: str) -> str:
    """A field's config key: a Python keyword can only be an attribute with a trailing `_` (`async_` is `async`)."""
    return attr[:-1] if attr.endswith("_") and keyword.iskeyword(attr[:-1]) else attr


def attr_of(key: str) -> str:
    return f"{key}_" if keyword.iskeyword(key) else key


def as_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {key_of(f.name): as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [as_dict(v) for v in obj]
    return obj


def field_types(cls: type) -> dict[str, Any]:
    """Config key -> type of each field of dataclass `cls`."""
    return {key_of(f.name): hints[f.name] for hints in [typing.get_type_hints(cls)] for f in dataclasses.fields(cls)}


def schema_of(cls: type) -> dict[str, Any]:
    """Dotted key -> type, for every leaf field."""
    schema: dict[str, Any] = {}
    for name, tp in field_types(cls).items():
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            for sub, subtp in field_types(tp).items():
                schema[f"{name}.{sub}"] = subtp
        else:
            schema[name] = tp
    return schema


def check_key(key: str, cls: type) -> None:
    schema = schema_of(cls)
    if key not in schema:
        parts = key.split(".")
        for leaf in (".".join(parts[:i]) for i in range(1, len(parts))):
            if leaf in schema:  # a file's mapping where a value belongs: `dir: {a: 1}` flattens to run.dir.a
                name = type_name(schema[leaf])
                raise ConfigError(
                    f"{key!r} sets a key inside {leaf}, which is {_a(name)}, not a section. HINT: give {leaf} itself {_a(name)}, e.g. --{leaf} <{name}>."
                )
        section = [k for k in schema if k.startswith(key + ".")]
        if section:
            raise ConfigError(
                f"{key!r} is a section, not a value: it holds {', '.join(section[:3])}, ... HINT: give its keys, e.g. "
                f"`[{key}]` with `{section[0].split('.', 1)[1]} = ...` in TOML, or --{section[0]} on the command line."
            )
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
                raise ConfigError(
                    f"{name!r} is set twice ({short(flat[name])}, then {short(leaf)}): once as a dotted key, once inside its section. HINT: keep one of them."
                )
            flat[name] = leaf
    return flat


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 40
_SHORT.maxlist = _SHORT.maxdict = 4
_SHORT.maxlevel = 2


def short(value: Any) -> str:
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
    """Whether a config file's (already typed) value has field type `tp`; a str is left to `coerce`."""
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
    return {str: '"text"', int: "3", float: "0.5", bool: "true"}.get(tp, type_name(tp))


def check_file_value(key: str, value: Any, tp: Any, source: str) -> None:
    """Refuse a config file's value whose type is not field type `tp` (`source` names the file).

    A flag is text, parsed by type in `coerce`; a file's value arrives typed, and `str()`/`int()` would
    paper over a mismatch: `dir: null` would train into ./None, `[a, b]` into "['a', 'b']".
    """
    if _fits(value, tp):
        return
    name, given = type_name(tp), _kind(value)
    list_tp = next((arg for arg in (tp, *typing.get_args(tp)) if typing.get_origin(arg) is list), None)
    if list_tp is not None and isinstance(value, list):  # name the item that does not fit, not just "a list"
        bad = next(item for item in value if not _fits(item, typing.get_args(list_tp)[0]))
        given = f"a list holding {_kind(bad)} ({short(bad)})"
    quote = " (quote text: unquoted, YAML reads null, no, 1.0 or 2024-01-01 as other types)" if "str" in name else ""
    raise ConfigError(
        f"{key}={short(value)} in {source} is {given}, not {_a(name)}. "
        f"HINT: give {key} {_a(name)}, e.g. {_example(tp)}{quote}, or delete it to keep the default."
    )


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Turn a flag string or file value into the field's type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return coerce(key, value, args[0])
    if origin is list:
        (item,) = typing.get_args(tp)
        items = value.split(",") if isinstance(value, str) else list(value)
        return [coerce(key, v.strip() if isinstance(v, str) else v, item) for v in items if v != ""]
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
            real = float(value)
            if not math.isfinite(real):  # nan passes every range check; inf is no setting either
                raise ConfigError(f"{key}={value!r} is not a finite number. HINT: pass --{key} with a finite value, or none where the key allows it.")
            return real
        if tp is str:
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {type_name(tp)}. HINT: pass --{key} <{type_name(tp)}>.") from None
    return value


def from_flat(flat: dict[str, Any], cls: type[Config]) -> Config:
    """Build a validated config of class `cls` from dotted keys (unknown keys are an error)."""
    schema = schema_of(cls)
    for key in flat:
        check_key(key, cls)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in flat.items():
        value = coerce(key, value, schema[key])
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
        else:
            top[key] = value
    types_ = field_types(cls)
    try:
        built = {name: types_[name](**{attr_of(k): v for k, v in values.items()}) for name, values in sections.items()}
    except TypeError as exc:  # a script section's own __init__ rejecting a value
        raise ConfigError(f"{exc}. HINT: check the keys of your script's section.") from None
    return cls(**top, **built)
