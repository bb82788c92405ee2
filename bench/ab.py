"""A/B runs of one scenario: the frameworks plus distrib under config overrides, order rotated each round.

    python bench/ab.py --scenario comm --rounds 6 --variant view=dist.gradient_as_bucket_view=true
    python bench/ab.py --smoke --frameworks hand --variant view=dist.gradient_as_bucket_view=true   # CI

For a question one scenario of bench/run.py raises (is distrib slower here, and does a setting
change it?); prints every run and the medians. Same launch, allocator settings and timing as run.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from run import ALLOCATOR, FRAMEWORKS, RUNNERS, SCENARIOS, SMOKE, check_args, launch, rotated, spread

import distrib


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="comm", choices=sorted(SCENARIOS))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE", help="distrib with one config override")
    p.add_argument("--out", type=Path, default=None, help="also write the runs and medians here as JSON")
    p.add_argument("--smoke", action="store_true", help="one short round of run.py's smoke workload (CI)")
    ns = p.parse_args(argv)
    check_args(p, "--frameworks", ns.frameworks, FRAMEWORKS, ns.rounds)
    nproc, args = SMOKE["plain"] if ns.smoke else SCENARIOS[ns.scenario]
    rounds = 1 if ns.smoke else ns.rounds
    runs = {fw: (RUNNERS[fw], []) for fw in ns.frameworks.split(",")}
    for v in ns.variant:
        name, _, setting = v.partition("=")
        key, _, value = setting.partition("=")
        if not name or not key or not value:
            p.error(f"--variant {v}: expected NAME=KEY=VALUE, e.g. view=dist.gradient_as_bucket_view=true")
        try:  # the same check distrib_run.py's Config.replace makes, before any launch
            distrib.Config().replace(**{key: value})
        except distrib.ConfigError as e:
            p.error(f"--variant {v}: {e}")
        runs[f"distrib_{name}"] = (RUNNERS["distrib"], ["--distrib_set", setting])
    results: dict[str, list[float]] = {name: [] for name in runs}
    received: dict[str, list[str]] = {}  # the overrides each runner reports it applied
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, (runner, extra) in rotated(list(runs.items()), r):
                record, wall = launch(runner, nproc, [*args, *extra], Path(tmp) / "result.jsonl", ALLOCATOR)
                results[name].append(record["steps_per_s"])
                received[name] = record.get("distrib_set", [])
                print(f"{ns.scenario} round {r + 1}/{rounds} {name:16s} {record['steps_per_s']:8.2f} steps/s  {wall:5.1f} s", flush=True)
    base = statistics.median(results["hand"]) if "hand" in results else None
    summary = {
        name: {
            "median": statistics.median(v),
            "spread": spread(v),
            "ratio_to_hand": statistics.median(v) / base if base else None,
            "runs": v,
            "distrib_set": received[name],
        }
        for name, v in results.items()
    }
    for name, s in summary.items():
        ratio = f"{s['ratio_to_hand']:.3f}" if s["ratio_to_hand"] else "-"
        print(f"{name:16s} median {s['median']:7.2f}  spread {s['spread']:6.1%}  ratio to hand {ratio}")
    if ns.out:
        ns.out.write_text(json.dumps({"scenario": "smoke" if ns.smoke else ns.scenario, "rounds": rounds, "results": summary}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
