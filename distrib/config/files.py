"""Config files: TOML, YAML or JSON, read into dotted keys. Refuses what would be silently wrong:
a FIFO or device for a file, YAML aliases, a key given twice."""

from __future__ import annotations

import functools
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from distrib.config.keys import flatten, short
from distrib.errors import ConfigError

_NOT_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


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
        raise ConfigError(
            f"--config {str(path)!r} is {what}, not a config file. HINT: write the config to a regular file "
            "(a .toml, .yaml or .json) and pass its path; a pipe or `<(...)` is not read."
        )


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
                raise ConfigError(
                    f"{self.source} uses the YAML alias *{event.anchor} (line {event.start_mark.line + 1}): config files may "
                    "not use anchors and aliases, since a few nested ones expand to gigabytes. HINT: write the value out in full."
                )
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
                    raise ConfigError(
                        f"{self.source}: key {short(key)} is given twice, on line {first} and line {line}; YAML would keep "
                        "only the last. HINT: delete one of them."
                    )
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
            return f"key {key!r} is given twice {where} ({short(first)}, then {short(second)})"
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
        raise ConfigError(
            f"--config {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r}). HINT: save it as UTF-8."
        ) from None
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
