"""The benchmarks' smoke runs (CI): every framework and every GPU-feed variant runs and reports; timings are not checked."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, child_env


def test_benchmark_smoke_runs_every_framework(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/run.py"), "--smoke", "--results", str(tmp_path)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "smoke.json").read_text())["results"]["plain"]
    assert set(results) == {"hand", "distrib", "accelerate", "fabric"}
    assert all(len(r["steps_per_s"]) == 1 and r["steps_per_s"][0] > 0 for r in results.values())
    table = (tmp_path / "smoke.md").read_text()
    assert table.count("| plain |") == 4 and (tmp_path / "smoke.png").stat().st_size > 10_000


def _gpu_feed_smoke(tmp_path, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu_feed.py"), "--smoke", *args, "--results", str(tmp_path)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads((tmp_path / "gpu-smoke.json").read_text())
    assert set(out["results"]) == {"resident", "distrib", "distrib_no_prefetch", "naive", "loader"}
    assert all(len(v) == 1 and v[0] > 0 for v in out["results"].values())
    assert out["feed_efficiency"]["resident"] == 1.0
    return out


def test_gpu_feed_benchmark_runs_its_code_paths_on_cpu(tmp_path):
    out = _gpu_feed_smoke(tmp_path, "--device", "cpu", "--set", "steps=5")
    assert out["meta"]["params"]["steps"] == 5
    assert "needs a CUDA device" in out["sync_check"]["skipped"]


@pytest.mark.gpu
def test_gpu_feed_benchmark_and_the_sync_check_on_cuda(tmp_path):
    out = _gpu_feed_smoke(tmp_path)
    sync = out["sync_check"]
    assert sync["clean_steps_ok"], sync["clean"]  # no host sync on non-logging steps
    assert sync["selftest_caught"], sync["selftest_tail"]  # and the check does catch a planted .item()


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("run.py", ["--scenarios", "plain,comms"], "--scenarios plain,comms: unknown comms; choose from plain,"),
        ("run.py", ["--rounds", "0"], "--rounds 0: must be at least 1"),
        ("ab.py", ["--frameworks", "hand,fabirc"], "--frameworks hand,fabirc: unknown fabirc; choose from hand,"),
        ("ab.py", ["--variant", "view"], "--variant view: expected NAME=KEY=VALUE"),
        ("ab.py", ["--variant", "view=dist.bucket_view=true"], "Unknown config key 'dist.bucket_view'. Did you mean"),
    ],
)
def test_benchmark_scripts_refuse_bad_arguments_before_any_launch(tmp_path, monkeypatch, capsys, script, args, message):
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # in process: the check runs before any launch
    main = importlib.import_module(script.removesuffix(".py")).main
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main([*args, *(["--results", str(out)] if script == "run.py" else ["--out", str(out / "ab.json")])])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and message in stderr, stderr[-2000:]
    assert not out.exists()  # refused before the first launch: nothing ran, nothing was written


def test_ab_smoke_runs_a_framework_and_a_distrib_config_variant(tmp_path):
    out = tmp_path / "ab.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/ab.py"),
            "--smoke",
            "--frameworks",
            "hand",
            "--variant",
            "view=dist.gradient_as_bucket_view=true",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert (summary["scenario"], summary["rounds"]) == ("smoke", 1)
    results = summary["results"]
    assert set(results) == {"hand", "distrib_view"}
    assert results["hand"]["ratio_to_hand"] == 1.0
    assert results["distrib_view"]["runs"][0] > 0 and results["distrib_view"]["ratio_to_hand"] > 0
    # the variant's override reached distrib's runner, and only it
    assert (results["hand"]["distrib_set"], results["distrib_view"]["distrib_set"]) == ([], ["dist.gradient_as_bucket_view=true"])
    assert "distrib_view" in done.stdout and "ratio to hand" in done.stdout


def test_defaults_cost_smoke_runs_every_variant(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/defaults.py"), "--smoke", "--results", str(tmp_path)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "defaults-smoke.json").read_text())["results"]["2"]
    assert set(results) == {"hand", "distrib", "ckpt10_async", "ckpt10_sync", "distrib_quick_exit"}
    assert all(len(r["wall_s"]) == 1 and r["first_step_s"][0] > 0 and r["loop_s"][0] > 0 and 0 < r["tail_s"][0] < r["wall_s"][0] for r in results.values())
    assert (tmp_path / "defaults-smoke.md").read_text().count("|") > 20 and (tmp_path / "defaults-smoke.png").stat().st_size > 5_000


def test_lm_benchmark_smoke_runs_the_hand_loop_and_distrib(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench/lm.py"), "--smoke"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 1/1 hand" in done.stdout and "round 1/1 distrib" in done.stdout and "distrib / hand step time: median" in done.stdout


def test_fsdp_benchmark_smoke_measures_both_strategies(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench/fsdp.py"), "--smoke"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"either", "ddp", "fsdp"} <= set(rows) and "FSDP / DDP step time at 2 ranks" in done.stdout
    assert rows["fsdp"].split("|")[7].strip() == "0.50"  # each rank holds half the state


def test_memory_benchmark_smoke_counts_activations_and_hsdp_collectives(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench/memory.py"), "--smoke"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    held = {r["mode"]: r["held"] for r in rows if "mode" in r}
    assert held["full"] < held["selective"] < held["none"]
    hsdp = next(r for r in rows if r.get("layout") == "hsdp")
    assert hsdp["ops"]["reduce_scatter_base"]["count"] == hsdp["ops"]["allreduce"]["count"] - 1  # per unit, plus the guard's norms
