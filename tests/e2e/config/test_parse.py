"""Config: precedence, file formats, unknown keys, validation messages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# --------------------------------------------------------------------------- a script's own config


SCRIPT = textwrap.dedent("""
    import dataclasses, sys
    import distrib

    @dataclasses.dataclass(kw_only=True)
    class Mine:
        width: int = 3
        \"\"\"The width.\"\"\"

    def train(cfg):
        print("WIDTH", cfg.model.width, cfg.train.epochs)

    sys.exit(distrib.main(train, sections={"model": Mine}, defaults={"train.epochs": 5}))
""")


@pytest.mark.parametrize(
    "argv, status, needle",
    [
        (["--model.width", "7"], 0, "WIDTH 7 5"),
        (["--help"], 0, "--model.width INT  (default: 3)"),
        (["-h"], 0, "The width."),
        (["positional"], 2, "distrib: error: Unexpected argument 'positional'"),
        (["--model.width", "x"], 2, "distrib: error: model.width='x' is not a valid int"),
        (["--optim.lr", "0.1"], 2, "distrib: error: Unknown config key 'optim.lr'"),
        (["--model.width", "nan"], 2, "distrib: error: model.width='nan' is not a valid int"),
    ],
)
def test_a_script_s_command_line_exits_like_the_cli(tmp_path, argv, status, needle):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == status, proc.stderr
    assert needle in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.py"]  # nothing written


def test_help_validates_the_script_s_sections_and_defaults(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.replace('defaults={"train.epochs": 5}', 'defaults={"train.epoch": 5}'))
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "distrib: error: Unknown config key 'train.epoch'" in proc.stderr
    assert "Traceback" not in proc.stderr
