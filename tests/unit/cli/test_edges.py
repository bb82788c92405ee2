"""The edges a hurried user finds: planted links, special files, full disks, damaged and old checkpoints.

One table per kind of edge. Each row runs the real command (the CLI's `main` in this process where
no process group is involved) on a scratch directory and checks the exit status, the message and
what is on disk afterwards: a link's target untouched, a device still a device, the last good
checkpoint named.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest

from distrib import Callback, fit
from distrib import main as distrib_main
from distrib.checkpoint import store as ck
from distrib.checkpoint.rundir import LOCK_FILE
from distrib.cli import export, report
from distrib.cli.train import main
from distrib.errors import ConfigError
from distrib.runtime.stop import StopRequest
from tests.helpers import read_summary

SMALL = ["--data.train_size", "256", "--data.eval_size", "64", "--train.batch_size", "32", "--train.epochs", "1", "--wandb.mode", "disabled"]


# ----------------------------------------------------------------------------- links distrib did not make


@pytest.mark.parametrize("planted", ["metrics.jsonl", LOCK_FILE, "config.json", "summary.json", "stopped.json"])
def test_a_planted_link_in_run_dir_is_refused_and_its_target_untouched(tmp_path, capsys, planted):
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("precious\n")
    (run / planted).symlink_to(victim)
    assert main([*SMALL, "--run.dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distrib: error: ") and f"{run / planted} is a symbolic link" in err and "HINT: remove it" in err
    assert victim.read_text() == "precious\n" and (run / planted).is_symlink()


def test_a_planted_checkpoints_link_is_refused_before_anything_is_read_or_written(tmp_path, capsys):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    (run / "checkpoints").symlink_to(elsewhere)
    assert main([*SMALL, "--train.max_steps", "2", "--run.dir", str(run)]) == 2
    assert f"{run / 'checkpoints'} is a symbolic link" in capsys.readouterr().err
    assert not any(elsewhere.iterdir())


def test_a_link_for_a_missing_lock_target_creates_nothing(tmp_path, capsys):
    run, target = tmp_path / "run", tmp_path / "created-by-distrib"  # as root, any path: /etc/... alike
    run.mkdir()
    (run / LOCK_FILE).symlink_to(target)
    assert main([*SMALL, "--run.dir", str(run)]) == 2
    assert not target.exists() and (run / LOCK_FILE).is_symlink()


def test_report_does_not_write_through_a_planted_link(tmp_path, capsys):
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    victim.write_text("precious\n")
    (run / "report.png").symlink_to(victim)
    assert report.main([str(run)]) == 2
    assert "report.png is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious\n"


def test_a_planted_previous_link_is_refused_before_anything_moves(tmp_path, capsys):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    assert main([*SMALL, "--train.max_steps", "2", "--run.dir", str(run)]) == 0
    elsewhere.mkdir()
    (run / "previous").symlink_to(elsewhere)
    before = sorted(p.name for p in run.iterdir())
    assert main([*SMALL, "--train.max_steps", "2", "--ckpt.resume", "never", "--run.dir", str(run)]) == 2
    assert "previous is a symbolic link" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before and not any(elsewhere.iterdir())


# ----------------------------------------------------------------------------- special files


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_export_never_replaces_a_device_node(tmp_path, capsys, device):
    run = tmp_path / "run"
    assert main([*SMALL, "--train.max_steps", "2", "--run.dir", str(run)]) == 0
    before = os.stat(device)
    assert export.main([str(run), "--out", device]) == 2
    err = capsys.readouterr().err
    assert f"{device} is a character device, not a regular file" in err and "HINT: pass --out a new file path" in err
    after = os.stat(device)
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino and after.st_rdev == before.st_rdev


def test_export_through_a_planted_link_is_refused(tmp_path, capsys):
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    assert main([*SMALL, "--train.max_steps", "2", "--run.dir", str(run)]) == 0
    victim.write_text("precious\n")
    (tmp_path / "model.pt").symlink_to(victim)
    assert export.main([str(run), "--out", str(tmp_path / "model.pt")]) == 2
    assert victim.read_text() == "precious\n"


def test_a_run_dir_past_the_path_limit_is_bad_input(tmp_path, capsys):
    deep = tmp_path.joinpath(*["d" * 200] * 21)
    assert main([*SMALL, "--run.dir", str(deep)]) == 2
    assert "passes the system's limit of" in capsys.readouterr().err and not (tmp_path / ("d" * 200)).exists()


def test_report_of_a_run_that_logged_nothing_yet_says_so_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert report.main([str(run)]) == 2
    assert "metrics.jsonl holds no metrics yet" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_report_skips_records_without_a_kind_or_a_step(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "loss": 2.0}, {"kind": "train", "loss": 2.0}, {"kind": "train", "step": 2, "loss": 1.5}, {"kind": "eval", "step": 2, "loss": 1.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert report.main([str(run)]) == 0
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- checkpoints: damaged, old, newer


def _two_checkpoints(run: Path) -> list[Path]:
    assert main([*SMALL, "--train.max_steps", "4", "--ckpt.every", "2", "--ckpt.keep", "2", "--run.dir", str(run)]) == 0
    return ck.candidates(run / "checkpoints")


@pytest.mark.parametrize(
    "manifest", ["{}", "[]", '{"step": 4, "world_size": 1, "files": {}}', '{"step": 4, "world_size": 1, "files": {"state.pt": {"size": 1, "crc32": "0"}}}']
)
def test_a_manifest_that_lists_too_little_falls_back_to_the_previous_checkpoint(tmp_path, capsys, manifest):
    run = tmp_path / "run"
    newest, previous = _two_checkpoints(run)
    (newest / ck.MANIFEST).write_text(manifest)
    with pytest.raises(ck.CheckpointError):
        ck.verify(newest)
    assert main([*SMALL, "--train.max_steps", "6", "--ckpt.every", "2", "--run.dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {newest.name} is not usable" in out and f"resumed from {previous}" in out


def test_a_checkpoint_of_a_newer_format_is_refused_naming_both_versions(tmp_path, capsys):
    run = tmp_path / "run"
    newest, _ = _two_checkpoints(run)
    manifest = json.loads((newest / ck.MANIFEST).read_text())
    assert manifest["format"] == ck.FORMAT
    (newest / ck.MANIFEST).write_text(json.dumps({**manifest, "format": ck.FORMAT + 1}))
    assert main([*SMALL, "--train.max_steps", "6", "--run.dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint format {ck.FORMAT + 1}, written by a newer distrib; this one reads formats 1 to {ck.FORMAT}" in err
    assert "HINT: resume it with the distrib that wrote it" in err


# ----------------------------------------------------------------------------- I/O errors mid-run


class _ReplaceCheckpointsDir(Callback):
    """After the first checkpoint, replace run.dir/checkpoints with a file: what a stray `rm -r` and a typo do."""

    def on_checkpoint(self, trainer, step):
        root = trainer.session.ckpt_root
        if root.is_dir():
            trainer.session.wait_for_save()
            shutil.rmtree(root)
            root.write_text("not a directory any more\n")


def test_checkpoints_dir_replaced_mid_run_is_an_error_not_a_traceback(tmp_path, capsys):
    from distrib.cli.task import SECTIONS, make_datasets, make_model

    def train(cfg):
        train_data, _ = make_datasets(cfg.task, train_size=cfg.data.train_size, eval_size=cfg.data.eval_size, seed=cfg.seed)
        return fit(cfg, model=make_model(cfg.task, seed=cfg.seed), train_data=train_data, callbacks=[_ReplaceCheckpointsDir()])

    run = tmp_path / "run"
    code = distrib_main(train, sections=SECTIONS, argv=[*SMALL, "--train.max_steps", "6", "--ckpt.every", "2", "--run.dir", str(run)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("distrib: error: cannot write ") and "not a directory any more" in err, err
    assert "something replaced it under the run" in err
    assert (run / "checkpoints").read_text() == "not a directory any more\n"  # what the user put there is left alone


def test_static_graph_with_accumulation_is_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*SMALL, "--dist.static_graph", "true", "--train.grad_accum", "2", "--run.dir", str(run)]) == 2
    assert "dist.static_graph=true with train.grad_accum=2" in capsys.readouterr().err and not run.exists()


def test_a_leftover_temporary_that_is_a_link_is_refused(tmp_path):
    from distrib.checkpoint.fileio import write_atomic

    target = tmp_path / "f.json"
    write_atomic(target, b"old")
    (tmp_path / f".f.json.part{os.getpid()}").symlink_to(tmp_path / "victim")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and not (tmp_path / "victim").exists()


# ----------------------------------------------------------------------------- signals


def test_the_stop_ballot_names_the_signal_that_arrived_on_another_rank():
    got, quiet = StopRequest(), StopRequest()
    got.handle(signal.SIGHUP)
    summed = [a + b for a, b in zip(got.ballot(), quiet.ballot())]
    assert quiet.count(summed) == 1 and quiet.reason == "SIGHUP" and quiet.requested
    assert StopRequest().count([0.0] * len(summed)) == 0
    user = StopRequest()
    user.set()  # a callback's request, no signal
    assert quiet.count([a + b for a, b in zip(user.ballot(), StopRequest().ballot())]) == 1


# ----------------------------------------------------------------------------- reruns and --debug


def _tree(path: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_rerun_of_a_finished_run_says_it_is_complete_and_changes_no_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*SMALL, "--run.dir", str(run)]) == 0
    before = _tree(run)
    capsys.readouterr()
    assert main([*SMALL, "--run.dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "is a complete run" in out and "no file changed" in out and "HINT: raise --train.epochs" in out
    assert _tree(run) == before  # not one byte, not one mtime
    assert main([*SMALL, "--train.epochs", "2", "--run.dir", str(run)]) == 0  # a longer run still continues it
    assert read_summary(run)["epochs_completed"] == 2


def test_debug_gets_a_run_dir_of_its_own_and_never_rewrites_a_real_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*SMALL, "--train.max_steps", "3"]) == 0  # the default run.dir, runs/distrib
    real = _tree(tmp_path / "runs" / "distrib")
    assert main([*SMALL, "--debug"]) == 0
    assert read_summary(tmp_path / "runs" / "distrib-debug")["world_size"] == 1
    assert _tree(tmp_path / "runs" / "distrib") == real
    assert main([*SMALL, "--train.max_steps", "3", "--run.dir", "runs/exp1"]) == 0
    real = _tree(tmp_path / "runs" / "exp1")
    assert main([*SMALL, "--debug", "--run.dir", "runs/exp1"]) == 2
    err = capsys.readouterr().err
    assert "holds a run that was not a debug run" in err and "HINT: pass --run.dir runs/exp1-debug" in err
    assert _tree(tmp_path / "runs" / "exp1") == real


# ----------------------------------------------------------------------------- every command answers --help


@pytest.mark.parametrize(
    "argv, says",
    [
        ([], "usage: distrib <command>"),
        (["doctor"], "usage: distrib doctor"),
        (["export"], "usage: distrib export"),
        (["report"], "usage: distrib report"),
        (["slurm", "submit"], "usage: distrib slurm submit"),
        (["train"], "usage: "),
    ],
)
def test_every_distrib_command_answers_help_without_doing_its_work(capsys, argv, says):
    from distrib.cli import main as cli

    try:
        code = cli.main([*argv, "--help"])
    except SystemExit as exc:  # argparse's --help
        code = exc.code
    out = capsys.readouterr().out
    assert code == 0 and says in out, out
    assert "launcher  " not in out  # the doctor's report: --help must not run the checks


@pytest.mark.parametrize("argv", [["--help"], ["prologue", "--help"], ["epilogue", "-h"]])
def test_python_m_distrib_slurm_answers_help(capsys, argv):
    from distrib.cli import slurm

    assert slurm.main(argv) == 0 and "usage: python -m distrib.slurm" in capsys.readouterr().out
