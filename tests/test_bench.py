"""The benchmark's smoke run (CI): all four frameworks run the workload and report; timings are not checked."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO, child_env


def test_benchmark_smoke_runs_every_framework(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench/run.py"), "--smoke", "--results", str(tmp_path)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "smoke.json").read_text())["results"]["plain"]
    assert set(results) == {"hand", "distrib", "accelerate", "fabric"}
    assert all(len(r["steps_per_s"]) == 1 and r["steps_per_s"][0] > 0 for r in results.values())
    table = (tmp_path / "smoke.md").read_text()
    assert table.count("| plain |") == 4 and (tmp_path / "smoke.png").stat().st_size > 10_000
