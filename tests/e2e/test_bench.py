"""The benchmarks' smoke runs (CI): every framework and every GPU-feed variant runs and reports; timings are not checked."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch

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


def test_the_gpu_check_runs_every_part_it_can_on_the_cpu_and_writes_every_field(tmp_path):
    # The same command a GPU session runs (scripts/gpu-check.sh), at tiny sizes: the language-model benchmark's
    # two loops at 2 gloo ranks with bf16 and torch.compile, the feed benchmark's variants, the sync check's run.
    done = subprocess.run(
        ["bash", str(REPO / "scripts/gpu-check.sh"), "--device", "cpu", "--smoke", "--results", str(tmp_path)],
        cwd=REPO,
        env=child_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("gpu-*-cpu-*.json")
    out = json.loads(path.read_text())
    assert set(out["device"]) == {"name", "count", "memory_gib", "driver", "cuda", "torch", "python", "host", "peak_bf16_flops"}
    parts = out["parts"]
    assert [parts[p]["status"] for p in ("pytest_gpu", "lm", "feed", "multi_gpu")] == ["skipped", "ok", "ok", "skipped"]
    assert parts["pytest_gpu"]["sync_paths_on_cpu"]["clean"] is True  # the sync check's own run (no check on the CPU)
    lm = parts["lm"]
    assert set(lm["tokens_per_s"]) == set(lm["mfu"]) == set(lm["data_wait_frac"]) == {"hand", "distrib"}
    assert lm["tokens_per_s"]["hand"] > 0 and lm["tokens_per_s_ratio"] > 0 and lm["flops_per_token"] > 0
    assert set(parts["feed"]["feed_efficiency"]) == {"resident", "distrib", "distrib_no_prefetch", "naive", "loader"}
    assert "LM tokens/s, fit / hand" in path.with_suffix(".md").read_text() and "LM tokens/s" in done.stdout
    # A full run's file (as a GPU writes it) redraws BENCHMARKS.md's GPU section, naming the device and date.
    sys.path.insert(0, str(REPO / "bench"))
    try:
        gpu = importlib.import_module("gpu")
    finally:
        sys.path.remove(str(REPO / "bench"))
    full = {**out, "smoke": False, "device": {**out["device"], "name": "NVIDIA H100 80GB HBM3", "count": 1, "memory_gib": 79.1}}
    results = tmp_path / "results"
    results.mkdir()
    (results / "gpu-2026-12-05-nvidia-h100-80gb-hbm3.json").write_text(json.dumps(full))
    page = tmp_path / "BENCHMARKS.md"
    page.write_text(f"# Benchmarks\n\n{gpu.BEGIN}\nold\n{gpu.END}\n\n## After\n")
    gpu.render(results, page)
    text = page.read_text()
    assert "### GPU check, 2026-12-05: NVIDIA H100 80GB HBM3" in text and "old" not in text and text.endswith("## After\n")
    assert (results / "gpu-check.png").stat().st_size > 5_000
    if torch.cuda.is_available():
        return  # the plain command would run the whole check
    # Without CUDA, the plain command says so and exits 0 at once.
    plain = subprocess.run(
        ["bash", str(REPO / "scripts/gpu-check.sh")], cwd=REPO, env=child_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=120
    )
    assert plain.returncode == 0 and "no CUDA device here" in plain.stdout


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
