"""From the command line and config files to a validated Config, and `--help`.

Precedence: field defaults < a script's defaults < config file (TOML, YAML or JSON) < `--section.key
value` flags. Unknown keys are an error that names the nearest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

from distrib.config import Config, _check_key, _field_types, _key, _schema, _type_name, config_class, flatten, from_flat
from distrib.errors import ConfigError


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into dotted keys."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {str(path)!r} is a directory. HINT: pass the config file itself (a .toml, .yaml or .json).")
    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r}: no such file. HINT: check the path (it is relative to {Path.cwd()}).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}). "
                          "HINT: save it as UTF-8.") from None
    except OSError as exc:
        raise ConfigError(f"--config {str(path)!r} cannot be read: {exc.strerror}. HINT: check its permissions.") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"--config {str(path)!r}: unknown format {suffix!r}. HINT: use a .toml, .yaml or .json file.")
    except ConfigError:
        raise
    except Exception as exc:  # parser errors differ per format; name the file and the cause
        raise ConfigError(f"--config {str(path)!r} could not be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {str(path)!r} must hold a mapping of sections, got {type(data).__name__}.")
    return flatten(data)


def parse_flags(argv: Sequence[str], cls: type[Config] = Config) -> tuple[str | None, dict[str, Any]]:
    """Split argv into (config file, dotted overrides). `--key value`, `--key=value`, bare `--flag` = true."""
    schema = _schema(cls)
    config_file: str | None = None
    overrides: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(
                f"Unexpected argument {arg!r}: distrib takes only --section.key value options. HINT: pass --train.epochs 3 "
                "style options; a script's own setting belongs in its section (sections={'mine': MyConfig} -> --mine.key value)."
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            next_is_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            if key != "config" and key in schema and schema[key] is bool and not next_is_value:
                value = "true"
            elif next_is_value:
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"--{key} needs a value. HINT: --{key} <value>.")
        if key == "config":
            config_file = value
        else:
            _check_key(key, cls)
            overrides[key] = value
        i += 1
    return config_file, overrides


def parse_config(
    argv: Sequence[str] | None = None, *, sections: Mapping[str, type] | None = None, defaults: Mapping[str, Any] | None = None
) -> Config:
    """Field defaults < the script's `defaults` < --config FILE < --section.key flags.

    `sections` adds a script's own dataclass sections; `defaults` (dotted keys) sets the script's
    defaults for any key, distrib's included. Raises ConfigError; `distrib.main` turns that into exit 2.
    """
    argv = sys.argv[1:] if argv is None else argv
    cls = config_class(sections)
    config_file, overrides = parse_flags(argv, cls)
    flat = flatten(cls().to_dict())
    for key, value in (defaults or {}).items():
        _check_key(key, cls)
        flat[key] = value
    if config_file is not None:
        flat.update(load_file(config_file))
    flat.update(overrides)
    return from_flat(flat, cls)


# --------------------------------------------------------------------------- --help


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field (the string literal that follows it in the class body)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue  # no source (a REPL, a frozen app): the key is listed without its text
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    docs[_key(stmt.target.id)] = " ".join(nxt.value.value.split())
    return docs


def config_help(cls: type[Config] = Config, *, prog: str | None = None, defaults: Mapping[str, Any] | None = None) -> str:
    """Every key with its type, default and docstring, by section (what `--help` prints)."""
    prog = prog or Path(sys.argv[0]).name
    values = flatten(cls().to_dict())
    values.update(defaults or {})
    lines = [
        f"usage: {prog} [--config FILE] [--section.key VALUE ...]",
        "",
        "Precedence: defaults < --config FILE (TOML, YAML, JSON) < flags. `none` unsets an optional key.",
    ]
    top_docs = _field_docs(cls)
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            lines += ["", f"[{name}]" + (f"  {top_docs[name]}" if name in top_docs else "")]
            docs = _field_docs(tp)
            entries = [(f"{name}.{sub}", subtp, docs.get(sub, "")) for sub, subtp in _field_types(tp).items()]
        else:
            entries = [(name, tp, top_docs.get(name, ""))]
        for key, ktp, doc in entries:
            shown = values[key]
            shown = "none" if shown is None else ",".join(map(str, shown)) if isinstance(shown, list) else shown
            lines.append(f"  --{key} {_type_name(ktp).upper()}  (default: {shown})")
            if doc:
                lines += [f"      {line}" for line in textwrap.wrap(doc, 92)]
    return "\n".join(lines)
