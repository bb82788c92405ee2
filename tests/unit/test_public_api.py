"""Golden files for what users build on: `distrib.__all__` with every signature, the config sections and
their keys and defaults, and every command's `--help`.

A change to any of them is a change to the public interface: review the diff of `tests/golden/`, then
regenerate with `DISTRIB_UPDATE_GOLDEN=1 pytest tests -k golden`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from pathlib import Path

import pytest

import distrib

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
UPDATE = os.environ.get("DISTRIB_UPDATE_GOLDEN") == "1"


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with DISTRIB_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), f"{name} changed: compare with {path}; if it is meant, regenerate (see this module's docstring)"


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"


def _describe(name: str, obj: object) -> list[str]:
    if inspect.isclass(obj):
        lines = [f"class {name}{_signature(obj)}"]
        # Inherited from distrib's own classes too: moving a member to a base class is not an API change.
        members = {k: v for c in reversed(obj.__mro__) if c.__module__.startswith("distrib") for k, v in vars(c).items()}
        for attr, member in sorted(members.items()):
            if attr.startswith("_"):
                continue
            if isinstance(member, property):
                lines.append(f"    {attr}: property")
            elif isinstance(member, (staticmethod, classmethod)):
                lines.append(f"    {attr}{_signature(member.__func__)}  # {type(member).__name__}")
            elif callable(member):
                lines.append(f"    {attr}{_signature(member)}")
            elif not dataclasses.is_dataclass(obj) or attr not in {f.name for f in dataclasses.fields(obj)}:
                lines.append(f"    {attr} = {member!r}")
        return lines
    if callable(obj):
        return [f"def {name}{_signature(obj)}"]
    return [f"{name} = {obj!r}"]


def test_golden_public_api():
    lines = []
    for name in distrib.__all__:
        lines += _describe(name, getattr(distrib, name))
    _check("api.txt", "\n".join(lines) + "\n")


def test_golden_config_sections():
    from distrib import config

    lines = []
    cfg = config.Config()
    for field in dataclasses.fields(cfg):
        section = type(getattr(cfg, field.name))
        if not dataclasses.is_dataclass(section):
            lines.append(f"{field.name}: {field.type} = {field.default!r}")
            continue
        assert getattr(config, section.__name__) is section  # distrib.config.<Section>Config
        lines.append(f"[{field.name}] distrib.config.{section.__name__}")
        for key in dataclasses.fields(section):
            default = key.default if key.default is not dataclasses.MISSING else key.default_factory()  # type: ignore[misc]
            lines.append(f"  {key.name}: {key.type} = {default!r}")
    _check("config.txt", "\n".join(lines) + "\n")


def _help(main, argv: list[str], capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's --help
        code = exc.code
    out = capsys.readouterr().out
    assert code == 0, out
    return out


COMMANDS = {
    "distrib": [],
    "distrib-doctor": ["doctor"],
    "distrib-export": ["export"],
    "distrib-report": ["report"],
    "distrib-slurm-submit": ["slurm", "submit"],
    "distrib-train": ["train"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_golden_command_help(name, capsys, monkeypatch):
    from distrib.cli import main as cli

    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal
    monkeypatch.setattr(sys, "argv", [name])  # and names the program after argv[0]
    _check(f"help/{name}.txt", _help(cli.main, [*COMMANDS[name], "--help"], capsys))


@pytest.mark.parametrize("argv", [["--help"], ["prologue", "--help"], ["epilogue", "--help"]])
def test_golden_slurm_module_help(argv, capsys, monkeypatch):
    from distrib.cli import slurm

    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(sys, "argv", ["slurm.py"])
    _check(f"help/python-m-distrib.slurm{'-' + argv[0] if len(argv) > 1 else ''}.txt", _help(slurm.main, argv, capsys))


def test_every_console_script_and_python_m_name_resolves():
    """pyproject's [project.scripts] and the `python -m distrib.*` names point at code that exists (a move must keep them)."""
    import importlib

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redefined]

    scripts = tomllib.loads((GOLDEN.parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"distrib", "distrib-train"}
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
    for name in ("distrib.train", "distrib.slurm", "distrib.doctor", "distrib.cli", "distrib.config.reference"):
        assert importlib.util.find_spec(name) is not None, name
    for name in ("distrib.train", "distrib.slurm", "distrib.doctor"):
        assert callable(importlib.import_module(name).main)
