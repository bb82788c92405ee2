"""From the command line and config files to a validated Config, and `--help`.

Precedence: field defaults < a script's defaults < config file (TOML, YAML or JSON) < `--section.key
value` flags. Unknown keys are an error that names the nearest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distrib.config.files import load_file
from distrib.config.keys import check_file_value, check_key, field_types, flatten, from_flat, key_of, schema_of, type_name
from distrib.config.schema import Config, config_class
from distrib.errors import ConfigError, error_exit


def parse_flags(argv: Sequence[str], cls: type[Config] = Config) -> tuple[str | None, dict[str, Any]]:
    """Split argv into (config file, dotted overrides). `--key value`, `--key=value`, bare `--flag` = true."""
    schema = schema_of(cls)
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
            check_key(key, cls)
            overrides[key] = value
        i += 1
    return config_file, overrides


def parse_config(argv: Sequence[str] | None = None, *, sections: Mapping[str, type] | None = None, defaults: Mapping[str, Any] | None = None) -> Config:
    """Field defaults < the script's `defaults` < --config FILE < --section.key flags.

    `sections` adds a script's own dataclass sections; `defaults` (dotted keys) sets the script's
    defaults for any key, distrib's included. Like argparse's `parse_args()`: reading the command
    line (`argv` None), `--help` prints every key and exits 0, and a bad value prints
    `distrib: error: ...` with the fix and exits 2. With an explicit `argv` it raises ConfigError
    instead (and `--help` is an unknown flag), which `distrib.main` turns into the same exits.
    """
    if argv is None:
        args = sys.argv[1:]
        try:
            if "-h" in args or "--help" in args:
                parse_config([], sections=sections, defaults=defaults)  # the script's sections and defaults must be valid too
                print(config_help(config_class(sections), defaults=defaults))
                raise SystemExit(0)
            return parse_config(args, sections=sections, defaults=defaults)
        except ConfigError as exc:
            raise SystemExit(error_exit(exc)) from None
    cls = config_class(sections)
    config_file, overrides = parse_flags(argv, cls)
    flat = flatten(cls().to_dict())
    for key, value in (defaults or {}).items():
        check_key(key, cls)
        flat[key] = value
    if config_file is not None:
        schema = schema_of(cls)
        for key, value in load_file(config_file).items():
            check_key(key, cls)
            check_file_value(key, value, schema[key], f"--config {config_file!r}")
            flat[key] = value
    flat.update(overrides)
    return from_flat(flat, cls)


# --------------------------------------------------------------------------- --help


def field_docs(cls: type) -> dict[str, str]:
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
                    docs[key_of(stmt.target.id)] = " ".join(nxt.value.value.split())
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
    top_docs = field_docs(cls)
    for name, tp in field_types(cls).items():
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines += ["", f"[{name}]" + (f"  {top_docs[name]}" if name in top_docs else "")]
            docs = field_docs(tp)
            entries = [(f"{name}.{sub}", subtp, docs.get(sub, "")) for sub, subtp in field_types(tp).items()]
        else:
            entries = [(name, tp, top_docs.get(name, ""))]
        for key, ktp, doc in entries:
            shown = values[key]
            shown = "none" if shown is None else ",".join(map(str, shown)) if isinstance(shown, list) else shown
            lines.append(f"  --{key} {type_name(ktp).upper()}  (default: {shown})")
            if doc:
                lines += [f"      {line}" for line in textwrap.wrap(doc, 92)]
    return "\n".join(lines)
