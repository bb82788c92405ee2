"""The trackers' parts that need no process: the checks before a run, the CSV's rows, the records' numbers."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import pytest

from distrib.config import parse_config
from distrib.errors import ConfigError
from distrib.observe.trackers import process

sys.path.append(str(Path(process.__file__).parent))  # the worker's modules import one another as top-level modules
import csv_tracker  # noqa: E402
import records  # noqa: E402
import tensorboard_tracker  # noqa: E402
import wandb_tracker  # noqa: E402


def test_a_tracker_whose_package_is_not_installed_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setitem(process.PACKAGES, "mlflow", "mlflow_is_not_installed_here")
    with pytest.raises(ConfigError, match=r"the mlflow_is_not_installed_here package is not installed. HINT: pip install 'distrib\[mlflow\]'"):
        process.check(parse_config(["--run.report_to", "csv,mlflow"]))
    process.check(parse_config(["--run.report_to", "csv,wandb"]))  # installed (or needing nothing): no error
    monkeypatch.setitem(process.PACKAGES, "wandb", "wandb_is_not_installed_here")
    with pytest.raises(ConfigError, match="wandb_is_not_installed_here package is not installed"):
        process.check(parse_config([]))
    process.check(parse_config(["--wandb.mode", "disabled"]))  # a disabled wandb is never started: no package needed
    monkeypatch.setenv("WANDB_MODE", "disabled")
    process.check(parse_config([]))


def test_an_own_tracker_must_import_and_have_log():
    with pytest.raises(ConfigError, match="'examples.no_such:Tracker' does not import"):
        process.check(parse_config(["--run.report_to", "examples.no_such:Tracker"]))
    with pytest.raises(ConfigError, match="has no log"):
        process.check(parse_config(["--run.report_to", "json:JSONDecoder"]))
    process.check(parse_config(["--run.report_to", "tests.trackers:RaisesInLog"]))


@pytest.mark.parametrize(
    "flag, message",
    [
        ("tensorbord,mlflw", "HINT: pass --run.report_to tensorboard,mlflow."),
        ("none,csv", "`none` goes alone"),
        ("csv,csv", "names a tracker twice (csv,csv). HINT: pass --run.report_to csv."),
        ("my module:X", "is not a tracker of your own as module:Class"),
    ],
)
def test_report_to_names_known_trackers_or_module_class_each_once(flag, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_config(["--run.report_to", flag])


def test_profile_is_a_window_of_steps():
    assert parse_config(["--train.profile", "20:25"]).train.profile_window == (20, 25)
    assert parse_config(["--train.profile", "7"]).train.profile_window == (7, 7)
    assert parse_config([]).train.profile_window is None
    for bad in ("5-7", "7:5", "0:2", "a:b", "²", "3" * 5000, "5:5:5"):
        with pytest.raises(ConfigError, match="HINT: pass --train.profile 20:25"):
            parse_config(["--train.profile", bad])


def test_the_csv_widens_its_header_for_a_new_key_and_a_resume_rebuilds_it_from_the_kept_records(tmp_path):
    run = types.SimpleNamespace(dir=str(tmp_path), resumed_step=None, kept_records=None)
    tracker = csv_tracker.CsvTracker()
    tracker.start(run)
    tracker.log({"kind": "train", "step": 2, "loss": 1.5})
    tracker.log({"kind": "eval", "step": 2, "loss": 1.25, "count": 64})
    tracker.log({"kind": "train", "step": 4, "loss": 1.0, "profiled": [3, 4]})
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv", newline="")))
    assert list(rows[0]) == ["kind", "step", "loss", "count", "profiled"]
    assert [(r["kind"], r["step"], r["count"], r["profiled"]) for r in rows] == [("train", "2", "", ""), ("eval", "2", "64", ""), ("train", "4", "", "[3, 4]")]
    # A resume from a checkpoint at step 2 that kept 2 records of metrics.jsonl; the killed attempt's CSV had only 1 of them.
    lines = [{"kind": "train", "step": 2, "loss": 1.5}, {"kind": "eval", "step": 2, "loss": 1.25, "count": 64}, {"kind": "train", "step": 4, "loss": 9.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "metrics.csv").write_text("kind,step,loss\ntrain,2,1.5\n")
    tracker = csv_tracker.CsvTracker()
    tracker.start(types.SimpleNamespace(dir=str(tmp_path), resumed_step=2, kept_records=2))
    tracker.log({"kind": "train", "step": 4, "loss": 1.0})
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv", newline="")))
    assert [(r["kind"], r["step"], r["loss"]) for r in rows] == [("train", "2", "1.5"), ("eval", "2", "1.25"), ("train", "4", "1.0")]


def test_the_csv_never_writes_through_a_planted_link(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    (tmp_path / "metrics.csv").symlink_to(target)
    with pytest.raises(RuntimeError, match="a link or not a file"):
        csv_tracker.CsvTracker().start(types.SimpleNamespace(dir=str(tmp_path), resumed_step=None, kept_records=None))
    assert target.read_text() == "keep me" and (tmp_path / "metrics.csv").is_symlink()


def test_records_become_kind_slash_key_numbers():
    assert records.scalars({"kind": "eval", "step": 8, "loss": 0.5, "count": 64, "ok": True, "profiled": [1]}) == (8, {"eval/loss": 0.5, "eval/count": 64.0})
    assert records.flat_config({"train": {"lr": 0.1, "x": None}, "seed": 0}) == {"train.lr": 0.1, "train.x": None, "seed": 0}


def test_a_huge_tracker_timeout_is_refused():
    with pytest.raises(ConfigError, match="over an hour"):
        parse_config(["--run.tracker_timeout_s", "1e30"])


def test_a_fresh_tensorboard_start_over_a_killed_attempts_events_hides_them(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def attempt(losses: dict[int, float]) -> None:
        tracker = tensorboard_tracker.TensorBoardTracker()
        tracker.start(types.SimpleNamespace(dir=str(tmp_path), resumed_step=None, kept_records=None, config={"seed": 0}))
        for step, loss in losses.items():
            tracker.log({"kind": "train", "step": step, "loss": loss})
        tracker.finish(None, "failed")

    attempt({2: 9.0, 4: 9.0, 6: 9.0})  # killed before its first checkpoint: the run starts over
    attempt({2: 1.0, 4: 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(2, 1.0), (4, 0.5)]


def test_wandb_never_writes_through_a_planted_link_in_run_dir(tmp_path):
    pytest.importorskip("wandb")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb").symlink_to(tmp_path / "elsewhere")
    run = types.SimpleNamespace(dir=str(tmp_path / "run"), options={"wandb": {"dir": str(tmp_path / "run"), "mode": "offline", "init_timeout": 5}})
    with pytest.raises(RuntimeError, match="a link or a file that distrib did not create"):
        wandb_tracker.WandbTracker().start(run)
    assert list((tmp_path / "elsewhere").iterdir()) == []
