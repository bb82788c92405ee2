"""From the command line and config files to a validated Config, and `--help`.

Precedence: field defaults < a script's defaults < config file (TOML, YAML or JSON) < `--section.key
value` flags. Unknown keys are an error that names the nearest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import os
import stat
import sys
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

from distrib.config import (Config, _check_key, _field_types, _key, _schema, _short, _type_name, check_file_value, config_class, flatten,
                            from_flat)
from distrib.errors import ConfigError


_NOT_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISSOCK, "a socket"))


def _check_regular_file(path: Path) -> None:
    """Refuse a path that is not a regular file, by `os.stat` before opening it: reading a FIFO blocks
    until a writer comes, and a device like /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"--config {str(path)!r}: no such file. HINT: check the path (it is relative to {Path.cwd()}).") from None
    except OSError as exc:
        raise ConfigError(f"--config {str(path)!r} cannot be read: {exc.strerror}. HINT: check the path and its permissions.") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"--config {str(path)!r} is a directory. HINT: pass the config file itself (a .toml, .yaml or .json).")
    if not stat.S_ISREG(mode):
        what = next((name for test, name in _NOT_FILES if test(mode)), "not a regular file")
        raise ConfigError(f"--config {str(path)!r} is {what}, not a config file. HINT: write the config to a regular file "
                          "(a .toml, .yaml or .json) and pass its path; a pipe or `<(...)` is not read.")


@functools.cache
def _yaml_loader() -> type:
    """PyYAML's SafeLoader, refusing aliases and repeated keys (built on first use: yaml is imported lazily)."""
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        source = "--config"
        """Names the file in messages."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            # An alias shares its anchor's node, so a few nested ones ("billion laughs") describe a value of
            # billions of items that any later walk expands: refuse the first alias, before anything grows.
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ConfigError(f"{self.source} uses the YAML alias *{event.anchor} (line {event.start_mark.line + 1}): config files may "
                                  "not use anchors and aliases, since a few nested ones expand to gigabytes. HINT: write the value out in full.")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            # PyYAML keeps the last of a repeated key silently; a config's repeated key is a mistake.
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<:` merges are overridden on purpose
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = lines.get(key)
                except TypeError:
                    continue  # an unhashable key: SafeLoader's own error names it
                if first is not None:
                    raise ConfigError(f"{self.source}: key {_short(key)} is given twice, on line {first} and line {line}; YAML would keep "
                                      "only the last. HINT: delete one of them.")
                lines[key] = line
            return super().construct_mapping(node, deep)

    return ConfigLoader


class _JsonObject(dict):
    """A JSON object that remembers its first repeated key and both values (json keeps the last silently)."""

    repeated: tuple[str, Any, Any] | None = None


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    for key, value in pairs:
        if key in obj and obj.repeated is None:
            obj.repeated = (key, obj[key], value)
        obj[key] = value
    return obj


def _repeated_json_key(node: Any, path: str = "") -> str | None:
    """Describe the first repeated key in a tree of `_JsonObject`s, naming its section (the hook sees no parents)."""
    if isinstance(node, _JsonObject):
        if node.repeated:
            key, first, second = node.repeated
            where = f"in section {path!r}" if path else "at the top level"
            return f"key {key!r} is given twice {where} ({_short(first)}, then {_short(second)})"
        children = [(f"{path}.{key}" if path else key, value) for key, value in node.items()]
    elif isinstance(node, list):
        children = [(f"{path}[{i}]", value) for i, value in enumerate(node)]
    else:
        return None
    for child, value in children:
        if found := _repeated_json_key(value, child):
            return found
    return None


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into dotted keys."""
    path = Path(path)
    _check_regular_file(path)
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
            loader = _yaml_loader()(text)
            loader.source = f"--config {str(path)!r}"
            try:
                data = loader.get_single_data() or {}
            finally:
                loader.dispose()
        elif suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_object)
            repeated = _repeated_json_key(data)
            if repeated:
                raise ConfigError(f"--config {str(path)!r}: {repeated}; JSON would keep only the last. HINT: delete one of them.")
        else:
            raise ConfigError(f"--config {str(path)!r}: unknown format {suffix!r}. HINT: use a .toml, .yaml or .json file.")
    except ConfigError:
        raise
    except Exception as exc:  # parser errors differ per format; name the file and the cause
        raise ConfigError(f"--config {str(path)!r} could not be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {str(path)!r} must hold a mapping of sections, got {type(data).__name__}.")
    try:
        return flatten(data)
    except ConfigError as exc:  # a key set both dotted and nested: name the file
        raise ConfigError(f"--config {str(path)!r}: {exc}") from None


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
            print(f"distrib: error: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
    cls = config_class(sections)
    config_file, overrides = parse_flags(argv, cls)
    flat = flatten(cls().to_dict())
    for key, value in (defaults or {}).items():
        _check_key(key, cls)
        flat[key] = value
    if config_file is not None:
        schema = _schema(cls)
        for key, value in load_file(config_file).items():
            _check_key(key, cls)
            check_file_value(key, value, schema[key], f"--config {config_file!r}")
            flat[key] = value
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
