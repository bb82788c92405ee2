"""The package's architecture, checked: which folder may import which, and how large a module may grow.

Layers, lowest first (each folder's `__init__.py` says the same in words):

    errors < config < runtime < parallel, data < checkpoint < observe < loop < cli

A module imports its own folder and the folders below it, never above: `runtime` cannot reach for
`loop`, and nothing but the commands and the public `distrib/__init__.py` imports `cli` or `loop`.
`parallel` and `data` sit side by side and do not import each other. Imports only for type
checking (`if TYPE_CHECKING:`) count too: they are the same dependency, seen by a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "distrib"
RANK = {"errors": 0, "config": 1, "runtime": 2, "parallel": 3, "data": 3, "checkpoint": 4, "observe": 5, "loop": 6, "cli": 7}
ENTRY_POINTS = {"__init__", "train", "slurm", "doctor"}  # distrib/*.py: the public API and `python -m` names, above every layer
MAX_LINES = 400


def _layer(module: str) -> str | None:
    """`distrib.checkpoint.store` -> `checkpoint`; `distrib.errors` -> `errors`; an entry point -> None (top)."""
    parts = module.split(".")
    if parts[0] != "distrib":
        return "outside"
    if len(parts) == 1 or parts[1] in ENTRY_POINTS:
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "distrib":  # `from distrib import config`: the names are modules or the public API
                found += [(node.lineno, f"distrib.{alias.name}" if alias.name in RANK else "distrib") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == "distrib" or name.startswith("distrib.")]


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def violations(package: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts):
        rel = path.relative_to(package.parent).with_suffix("")
        here = _layer(".".join(rel.parts))
        if here is None:
            continue  # the entry points may import anything
        for line, name in _imports(path):
            there = _layer(name)
            if there is None or there == "outside":
                out.append(f"{rel}.py:{line} ({here}) imports {name}, the public API or an entry point: import the module it comes from")
            elif there != here and (RANK[there] > RANK[here] or (RANK[there] == RANK[here])):
                out.append(f"{rel}.py:{line} ({here}) imports {name} ({there}), which is not below it")
    return out


def test_every_import_goes_down_the_layers():
    assert violations() == []


def test_the_rule_fails_when_a_lower_layer_imports_loop_or_cli(tmp_path):
    fake = tmp_path / "distrib"
    for folder, text in {
        "runtime": "from distrib.loop.session import Session\n",
        "data": "import distrib.cli.main\n",
        "checkpoint": "from distrib.parallel import fsdp\n",
        "parallel": "from distrib.data import loaders\n",
    }.items():
        (fake / folder).mkdir(parents=True)
        (fake / folder / "mod.py").write_text(text)
    found = violations(fake)
    assert any("runtime/mod.py:1 (runtime) imports distrib.loop.session (loop)" in v for v in found)
    assert any("data/mod.py:1 (data) imports distrib.cli.main (cli)" in v for v in found)
    assert any("parallel/mod.py:1 (parallel) imports distrib.data (data)" in v for v in found)  # siblings
    assert not any("checkpoint/mod.py" in v for v in found)  # downwards is fine
    assert len(found) == 3


def test_every_folder_says_what_lives_there_and_what_it_may_import():
    for folder in RANK:
        if folder == "errors":
            continue
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and "Imports" in doc, f"distrib/{folder}/__init__.py needs a docstring naming what it holds and may import"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_is_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines: split it at a seam (see docs/architecture.md)"


def test_fit_takes_exactly_the_trainers_arguments():
    import inspect

    from distrib import Trainer, fit

    fit_args = [p for p in inspect.signature(fit).parameters if p != "cfg"]
    trainer_args = [p for p in inspect.signature(Trainer.__init__).parameters if p not in ("self", "session")]
    assert fit_args == trainer_args
