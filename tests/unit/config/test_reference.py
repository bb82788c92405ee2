"""docs/config.md is generated from the config dataclasses (`distrib/config/reference.py`): it must match.

In process, no launches. When it fails, regenerate with `python -m distrib.config.reference`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distrib.config import Config, OptimConfig, field_docs, flatten, reference


def test_docs_config_md_is_current() -> None:
    assert reference.DOC.exists(), f"{reference.DOC} is missing: run `{reference.COMMAND}` to write it"
    assert reference.DOC.read_text(encoding="utf-8") == reference.render(), (
        f"{reference.DOC} is stale: the config dataclasses changed. Run `{reference.COMMAND}` and commit the result."
    )


def test_every_key_is_documented_with_its_docstring() -> None:
    text = reference.render()
    for key in [*flatten(Config().to_dict()), *(f"optim.{k}" for k in field_docs(OptimConfig))]:
        assert f"`--{key}`" in text, key
    assert field_docs(OptimConfig)["lr"] in text


def test_check_says_whether_the_file_is_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.md"
    assert reference.main(["--check", str(path)]) == 1  # missing
    assert reference.main([str(path)]) == 0
    assert reference.main(["--check", str(path)]) == 0
    path.write_text(path.read_text(encoding="utf-8").replace("Peak learning rate.", "Peak rate."), encoding="utf-8")
    assert reference.main(["--check", str(path)]) == 1
    assert reference.COMMAND in capsys.readouterr().err
