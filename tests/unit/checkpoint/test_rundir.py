"""Bad inputs and hazards, one table each: the command, its exit status, the message, and what is on disk after.

Bad input exits 2 with `distrib: error:`, the field and the fix, and writes nothing (no run.dir, or
the existing one byte-for-byte as it was). Failures of the environment (the ranks cannot meet)
exit 1. Everything runs for real: the CLI's `main` in this process where no process group is
involved, real subprocesses, real ports and real file locks otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from distrib.checkpoint import store as ck
from distrib.checkpoint.rundir import LOCK_FILE, RunLock
from distrib.cli import doctor, report
from distrib.cli.slurm import submit_main
from distrib.cli.train import main
from distrib.errors import BatchError
from tests.helpers import read_metrics, read_summary, rewind

SMALL = ["--data.train_size", "512", "--data.eval_size", "64", "--train.batch_size", "32", "--train.epochs", "1", "--wandb.mode", "disabled"]


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` with its sha256: equal trees are byte-for-byte the same."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def _files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a_file").write_text("not a directory\n")
    (tmp_path / "latin1.yaml").write_bytes(b"train:\n  epochs: \xff\n")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "scalar.toml").write_text("train = 3\n")
    return {name: tmp_path / name for name in ("a_file", "latin1.yaml", "a_dir", "scalar.toml")}


def _fill(text: str, files: dict[str, Path]) -> str:
    for name, path in files.items():
        text = text.replace("{" + name + "}", str(path))
    return text


# (flags, the message's needle); {name} is a path from _files. Every case: exit 2, HINT, no run.dir.
BAD_INPUT = [
    (["--optim.lr", "nan"], "optim.lr='nan' is not a finite number"),
    (["--optim.lr", "inf"], "optim.lr='inf' is not a finite number"),
    (["--train.clip_grad_norm", "nan"], "train.clip_grad_norm='nan' is not a finite number"),
    (["--dist.timeout_s", "nan"], "dist.timeout_s='nan' is not a finite number"),
    (["--optim.lr", "-1"], "optim.lr=-1.0 must be > 0. HINT: pass --optim.lr a value above 0"),
    (["--train.batch_size", "-1"], "train.batch_size=-1 must be > 0. HINT: pass --train.batch_size 1 or larger"),
    (["--train.batch_size", "99999999999999999999"], "train.batch_size='99999999999999999999' is out of range"),
    (["--train.max_steps", "10000000000000000000000"], "train.max_steps='10000000000000000000000' is out of range"),
    (["--data.num_workers", "100000000"], "data.num_workers=100000000 is more processes"),
    (["--data.train_size", "0"], "data.train_size=0 must be > 0"),
    (["--train.precision", "fp8"], "train.precision='fp8' is not one of"),
    (["--train.epoch", "2"], "Did you mean 'train.epochs'"),
    (["--dist.backend", "nccl", "--run.device", "cpu"], "dist.backend='nccl' needs CUDA"),
    (["stray"], "Unexpected argument 'stray'"),
    (["--run.dir", "{a_file}"], "is a file, not a directory"),
    (["--run.dir", "{a_file}/run"], "cannot be created"),
    (["--run.dir", "runs/" + "x" * 300], "has 300 bytes; file systems allow 255"),
    (["--config", "{latin1.yaml}"], "is not UTF-8 text"),
    (["--config", "{a_dir}"], "is a directory. HINT: pass the config file itself"),
    (["--config", "{scalar.toml}"], "'train' is a section, not a value"),
    (["--config", "missing.toml"], "no such file"),
]


@pytest.mark.parametrize("flags, needle", BAD_INPUT, ids=[" ".join(f) for f, _ in BAD_INPUT])
def test_bad_input_exits_2_names_the_fix_and_writes_nothing(tmp_path, capsys, flags, needle):
    files = _files(tmp_path)
    before = tree(tmp_path)
    argv = [_fill(f, files) for f in flags]
    run = ["--run.dir", str(tmp_path / "never")] if "--run.dir" not in flags else []
    assert main([*SMALL, *run, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distrib: error: ") and needle in err, err
    assert "HINT" in err
    assert tree(tmp_path) == before and not (tmp_path / "never").exists()


def test_bad_environment_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert main([*SMALL, "--run.dir", str(tmp_path / "never")]) == 2
    assert "WORLD_SIZE is not set" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------- batches that cannot fit


class ShortContext(nn.Module):
    """A model with a fixed capacity, like a position table: batches above `limit` samples cannot run."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.fc = limit, nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise RuntimeError(f"at most {self.limit} rows fit, got {x.shape[0]}")
        return self.fc(x)


class Points(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        return torch.full((4,), float(i)), torch.tensor(i % 2)


@pytest.mark.parametrize(
    "flags, key", [({"train.batch_size": 16}, "train.batch_size=16"), ({"train.batch_size": 8, "train.eval_batch_size": 32}, "train.eval_batch_size=32")]
)
def test_a_batch_size_that_cannot_fit_fails_in_the_probe_for_train_and_eval(tmp_path, flags, key):
    import distrib
    from tests.helpers import TaskData

    cfg = TaskData().replace(**{"run.dir": str(tmp_path / "never"), "run.device": "cpu", "wandb.mode": "disabled", **flags})
    model = ShortContext(limit=8)
    with pytest.raises(BatchError) as err:
        distrib.fit(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data=Points(), eval_data=Points())
    assert key in str(err.value) and "at most 8 rows fit" in str(err.value)
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------- resuming what does not match


SAME = ["--optim.name", "sgd", "--optim.schedule", "constant", "--optim.lr", "0.1", "--ckpt.every", "4", "--ckpt.keep", "10", "--train.log_every", "4"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-epoch run (16 steps of SGD with a constant rate, checkpoints every 4 steps) to resume from."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main([*SMALL, *SAME, "--run.dir", str(run)]) == 0
    return run


def _said(capsys) -> str:
    """What a run printed: rank 0 logs to stdout, warnings included; errors go to stderr."""
    captured = capsys.readouterr()
    return captured.out + captured.err


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


REFUSED_RESUMES = [
    ([*SAME, "--task.hidden", "32"], ["model: shapes differ: 0.weight [128, 32] -> [32, 32]", "task.hidden 128 -> 32"]),
    ([*SAME, "--optim.name", "adamw"], ["optimizer: another kind of optimizer", "optim.name 'sgd' -> 'adamw'"]),
    ([*SAME, "--task.depth", "3"], ["model: 2 parameter(s) not in the checkpoint", "task.depth 2 -> 3"]),
]


@pytest.mark.parametrize("flags, needles", REFUSED_RESUMES, ids=[" ".join(f) for f, _ in REFUSED_RESUMES])
def test_a_resume_that_does_not_match_exits_2_naming_the_keys_and_changes_no_file(tmp_path, capsys, finished, flags, needles):
    run = _copy(finished, tmp_path)
    rewind(run, 8)  # a run that died mid-epoch: a resume would continue it
    before = tree(run)
    assert main([*SMALL, *flags, "--run.dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distrib: error: cannot resume from") and all(n in err for n in needles), err
    assert "--ckpt.resume never" in err and "another --run.dir" in err
    assert tree(run) == before


def test_a_changed_learning_rate_is_applied_on_resume_and_recorded(tmp_path, capsys, finished):
    run = _copy(finished, tmp_path)
    rewind(run, 8)
    assert main([*SMALL, *SAME, "--optim.lr", "0.05", "--run.dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "resuming with a changed config: optim.lr 0.1 -> 0.05 (applied; optimizer group 0 lr 0.1 -> 0.05)" in out
    lrs = [r["lr"] for r in read_metrics(run) if r["kind"] == "train"]
    assert lrs == [0.1, 0.1, 0.05, 0.05], lrs  # steps 4 and 8 from before the resume, 12 and 16 at the new rate
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.05


def test_all_checkpoints_unusable_refuses_a_silent_fresh_start(tmp_path, capsys, finished):
    run = _copy(finished, tmp_path)
    for state in run.glob("checkpoints/*/state.pt"):
        state.write_bytes(b"garbage")
    before = tree(run)
    assert main([*SMALL, *SAME, "--run.dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "none is usable" in err and "--ckpt.resume never" in err
    assert tree(run) == before


def test_resume_never_sets_the_previous_run_aside_and_never_mixes_checkpoints(tmp_path, capsys, finished):
    run = _copy(finished, tmp_path)
    old = tree(run)
    assert main([*SMALL, *SAME, "--train.max_steps", "6", "--ckpt.resume", "never", "--run.dir", str(run)]) == 0
    assert "previous run's checkpoints, metrics.jsonl" in _said(capsys)
    (aside,) = (run / "previous").iterdir()
    assert tree(aside) == old  # the whole previous run, byte for byte
    # This run's only (not the old 16): ckpt.every's step 4, and its last step.
    assert [p.name for p in ck.candidates(run / "checkpoints")] == ["step-000000006", "step-000000004"]
    assert read_summary(run)["optimizer_steps"] == 6
    # An auto resume now continues the new run where it ended, not the old one.
    assert main([*SMALL, *SAME, "--train.max_steps", "7", "--run.dir", str(run)]) == 0
    assert f"resumed from {run}/checkpoints/step-000000006" in capsys.readouterr().out
    assert read_summary(run)["optimizer_steps"] == 7


def test_an_explicit_checkpoint_sets_the_previous_run_aside_too(tmp_path, capsys, finished):
    other = _copy(finished, tmp_path)  # a run whose checkpoint we start from
    run = tmp_path / "used"
    shutil.copytree(finished, run)  # a finished run already in the directory we train in
    start = ck.step_dir(other / "checkpoints", 8)
    assert main([*SMALL, *SAME, "--seed", "7", "--ckpt.resume", str(start), "--train.max_steps", "12", "--run.dir", str(run)]) == 0
    said = _said(capsys)
    assert f"resumed from {start}" in said and f"ckpt.resume={start}: the previous run's" in said and "moved to" in said
    assert [p.name for p in ck.candidates(run / "checkpoints")] == ["step-000000012"]  # not the old run's 16
    (aside,) = (run / "previous").iterdir()
    assert [p.name for p in ck.candidates(aside / "checkpoints")][0] == "step-000000016"
    # A checkpoint inside the directory itself is followed to where it was moved.
    assert main([*SMALL, *SAME, "--ckpt.resume", str(run / "checkpoints" / "step-000000012"), "--run.dir", str(run)]) == 0
    assert "resumed from" in _said(capsys) and read_summary(run)["optimizer_steps"] == 16


def test_a_foreign_higher_step_directory_never_pushes_good_checkpoints_out(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-999999999").mkdir(parents=True)  # junk: no manifest
    for step in (10, 20, 30):
        ck.save(root, step, rank=0, world_size=1, keep=2, shared={"w": torch.zeros(1)}, per_rank={})
    assert [p.name for p in ck.candidates(root)] == ["step-999999999", "step-000000030", "step-000000020"]
    assert ck.newest_good(root)[1]["step"] == 30


# --------------------------------------------------------------------------- one writer per run.dir


def test_the_lock_is_released_and_a_run_dir_made_only_for_it_removed(tmp_path):
    lock = RunLock(tmp_path / "new" / "run")
    lock.acquire()
    assert (tmp_path / "new" / "run" / LOCK_FILE).exists()
    lock.release()
    assert not (tmp_path / "new" / "run").exists() and (tmp_path / "new").exists()


# --------------------------------------------------------------------------- torn metrics


def test_a_torn_metrics_line_is_dropped_by_resume_and_by_report(tmp_path, capsys, finished):
    run = _copy(finished, tmp_path)
    whole = read_metrics(finished)
    rewind(run, 8)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "train", "step": 9, "lo')  # a kill in the middle of a write
    assert report.main([str(run), "--out", str(tmp_path / "plots")]) == 0  # a directory: report.png inside
    captured = capsys.readouterr()
    assert "skipped 1 torn or unreadable line" in captured.err and (tmp_path / "plots" / "report.png").is_file()
    assert main([*SMALL, *SAME, "--run.dir", str(run)]) == 0
    assert "dropped 1 torn or unreadable line" in _said(capsys)
    resumed = read_metrics(run)
    assert [(r["kind"], r["step"]) for r in resumed] == [(r["kind"], r["step"]) for r in whole]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]


@pytest.mark.parametrize("out, needle", [("plot.txt", "PNG, PDF or SVG"), ("{a_file}/x.png", "cannot write the plot")])
def test_report_refuses_odd_out_paths_with_exit_2(tmp_path, capsys, finished, out, needle):
    files = _files(tmp_path)
    assert report.main([str(finished), "--out", _fill(out, files)]) == 2
    assert needle in capsys.readouterr().err


def test_report_survives_garbage_lines_and_records_without_the_usual_keys(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_bytes(b'\xff\xfe\n[1, 2]\n{"kind": "train", "step": 1}\n{"kind": "eval", "step": 1, "loss": 2.5}\n')
    assert report.main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 torn or unreadable" in captured.err and "eval at step 1: loss 2.5000" in captured.out


# --------------------------------------------------------------------------- the environment


DOCTOR = [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT are not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"}, "MASTER_PORT=99999 is not a TCP port"),
    ({"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-"}, "SLURM_JOB_NODELIST='n[1-' is malformed"),
    ({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-"}, "unbalanced brackets"),
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "localhost"}, "the batch shell of Slurm job 5"),
    (
        {"SLURM_JOB_ID": "x", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "two", "SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "zz"},
        "SLURM_NTASKS='two' is not an integer",
    ),
    (
        {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NUM_NODES": "-1", "SLURM_GPUS_ON_NODE": "x"},
        "SLURM_JOB_NODELIST is not set",
    ),
]


@pytest.mark.parametrize("env, needle", DOCTOR, ids=[next(iter(e.items()))[0] + str(i) for i, (e, _) in enumerate(DOCTOR)])
def test_doctor_flags_what_training_would_fail_on_and_never_crashes(monkeypatch, capsys, env, needle):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "TORCHELASTIC", "GROUP_RANK")):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert needle in out and "ERROR" in out and "fix:" in out, out


SUBMIT = [
    (["--partition", "gpu\necho pwned"], "is not a Slurm partition"),
    (["--time", "1:00;touch /tmp/pwned"], "is not a Slurm time"),
    (["--time", "$(reboot)"], "is not a Slurm time"),
    (["--", "--train.epoch", "2"], "Did you mean 'train.epochs'"),
    (["--", "--optim.lr", "nan"], "is not a finite number"),
]


@pytest.mark.parametrize("argv, needle", SUBMIT, ids=[repr(a) for a, _ in SUBMIT])
def test_slurm_submit_refuses_unsafe_options_and_bad_training_args_before_submitting(capsys, argv, needle):
    assert submit_main(["--dry-run", *argv]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.out == ""  # no script was produced


def test_wandb_auto_looks_for_credentials_of_the_host_wandb_is_configured_for(tmp_path):
    from distrib.observe.trackers.process import has_credentials

    (tmp_path / "settings").write_text("[default]\nbase_url = https://wandb.example.org\n")
    (tmp_path / "netrc").write_text("machine wandb.example.org login user password secret\n")
    env = {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path), "NETRC": str(tmp_path / "netrc")}
    assert has_credentials(env)
    assert not has_credentials({**env, "WANDB_BASE_URL": "https://api.wandb.ai"})


# --------------------------------------------------------------------------- world size
