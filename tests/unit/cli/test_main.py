"""The `distrib` command's own input errors: the same `distrib: error: ... HINT:` and exit 2 as a bad config value."""

from __future__ import annotations

import pytest

from distrib.cli import main as cli


@pytest.mark.parametrize(
    "argv, says",
    [
        (["report"], "distrib report: the following arguments are required: run_dir"),
        (["doctor", "--bogus"], "distrib doctor: unrecognized arguments: --bogus"),
        (["export", "ckpt"], "distrib export: the following arguments are required: --out"),
        (["slurm", "submit", "--nodes", "two"], "distrib slurm submit: argument --nodes: invalid int value: 'two'"),
        (["frobnicate"], "unknown command 'frobnicate'. HINT: `distrib --help` lists the commands"),
        (["slurm", "sub"], "unknown command 'slurm sub'. HINT: did you mean `distrib slurm submit`?"),
    ],
)
def test_a_bad_argument_is_a_distrib_error_with_exit_2(argv, says, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("distrib: error: ") and says in err and "HINT: " in err, err


def test_distrib_slurm_alone_shows_its_usage(capsys):
    assert cli.main(["slurm"]) == 0 and "usage: distrib slurm submit" in capsys.readouterr().out
