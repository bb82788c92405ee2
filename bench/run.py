"""Run the benchmark: the same workload under (a) a hand-written DDP loop, (b) distrib, (c) Accelerate,
(d) Lightning Fabric, each under `torchrun --nproc_per_node=N` on gloo with one thread per rank.

    python bench/run.py                      # every scenario, 5 alternating rounds (a b c d a b c d ...)
    python bench/run.py --scenarios plain,accum4 --rounds 7
    python bench/run.py --smoke              # CI: one short round of `plain`, checks that all four run

Writes bench/results/<name>.json (every run) and .md (the tables) and .png (the plot), and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FRAMEWORKS = ("hand", "distrib", "accelerate", "fabric")
RUNNERS = {"hand": "hand.py", "distrib": "distrib_run.py", "accelerate": "accelerate_run.py", "fabric": "fabric_run.py"}
# Extra runs for one scenario: name -> (runner, extra arguments). accum4's reference for what
# skipping the all-reduce on 3 of 4 micro-batches gains: the hand loop without no_sync.
EXTRAS: dict[str, dict[str, tuple[str, list[str]]]] = {"accum4": {"hand_sync_every_micro": ("hand.py", ["--sync_every_micro"])}}

# name -> (processes, runner arguments). Per-process batch is fixed, so 1 vs 2 processes is weak scaling.
SCENARIOS: dict[str, tuple[int, list[str]]] = {
    "plain": (2, ["--dim", "256", "--hidden", "1024", "--depth", "3", "--batch", "64", "--steps", "150"]),
    "accum4": (2, ["--dim", "256", "--hidden", "1024", "--depth", "3", "--batch", "64", "--accum", "4", "--steps", "60"]),
    "workers1": (2, ["--dim", "256", "--hidden", "1024", "--depth", "3", "--batch", "64", "--workers", "1", "--sample_cost", "3", "--steps", "100"]),
    "compute": (2, ["--dim", "1024", "--hidden", "2048", "--depth", "4", "--batch", "256", "--steps", "40"]),
    "comm": (2, ["--dim", "2048", "--hidden", "2048", "--depth", "3", "--batch", "4", "--steps", "100"]),
    "plain_1proc": (1, ["--dim", "256", "--hidden", "1024", "--depth", "3", "--batch", "64", "--steps", "150"]),
}
# The same fixed glibc malloc thresholds for every framework (distrib's CPU launchers set these too).
# With glibc's default *dynamic* threshold, whether a step's multi-MB temporaries are served from
# fresh mmap'd pages (page faults every step) depends on the process's allocation history: a DDP
# wrapper or not changed a 1-process run by 25%, which measures the allocator, not the framework.
# `--default-malloc` runs without them (see BENCHMARKS.md).
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}
SMOKE = {"plain": (2, ["--dim", "64", "--hidden", "128", "--depth", "2", "--batch", "32", "--warmup", "2", "--steps", "8", "--log_every", "5"])}


def launch(runner: str, nproc: int, args: list[str], out: Path, allocator: dict[str, str]) -> tuple[dict, float]:
    """One torchrun launch of `runner` (a script in bench/); returns rank 0's record and the whole process's wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **allocator, "BENCH_RESULT": str(out), "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(HERE / runner), *args]
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    check(done, out, runner, peer=runner != RUNNERS["distrib"])
    return json.loads(out.read_text().splitlines()[-1]), wall


def check(done: subprocess.CompletedProcess, out: Path, name: str, *, peer: bool) -> None:
    """Raise unless the launch succeeded and rank 0 reported.

    A peer's loop (never distrib's) can abort in gloo's teardown at exit under torch 2.13 (SIGABRT,
    "terminate called without an active exception"; see hand.py) after rank 0 reported: that
    measurement is whole, so it is kept, and the abort is said.
    """
    teardown_abort = peer and done.returncode != 0 and out.exists() and "exitcode: -6" in done.stderr
    if (done.returncode != 0 and not teardown_abort) or not out.exists():
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    if teardown_abort:
        print(f"note: {name} aborted in its process-group teardown after reporting; its result is kept", flush=True)


def rotated(order: list, r: int) -> list:
    """Round r's order. Runs alternate, and the order rotates each round: with a fixed order a
    machine that slows down during the run would always penalise the frameworks that go last."""
    return order[r % len(order) :] + order[: r % len(order)]


def check_args(p: argparse.ArgumentParser, flag: str, names: str, known, rounds: int) -> None:
    """Bad names or rounds are refused before the first launch, not after an hour of rounds."""
    unknown = [n for n in names.split(",") if n not in known]
    if unknown:
        p.error(f"{flag} {names}: unknown {', '.join(unknown)}; choose from {','.join(known)}")
    if rounds < 1:
        p.error(f"--rounds {rounds}: must be at least 1")


def spread(values: list[float]) -> float:
    """(max - min) / median: how far apart the rounds were."""
    return (max(values) - min(values)) / statistics.median(values)


def table(results: dict) -> str:
    rows = ["| scenario | framework | steps/s (median) | spread | ratio to hand | process wall s (median) |", "|---|---|---|---|---|---|"]
    for name, per in results.items():
        base = statistics.median(per["hand"]["steps_per_s"])
        for fw in per:
            sps = per[fw]["steps_per_s"]
            rows.append(
                f"| {name} | {fw} | {statistics.median(sps):.2f} | {spread(sps):.1%} | {statistics.median(sps) / base:.3f} | {statistics.median(per[fw]['wall_s']):.1f} |"
            )
    return "\n".join(rows)


def ratios(results: dict) -> dict[str, dict[str, float]]:
    """Per scenario, distrib's median step time over each peer's (> 1: distrib is slower)."""
    out = {}
    for name, per in results.items():
        d = statistics.median(per["distrib"]["steps_per_s"])
        out[name] = {fw: statistics.median(per[fw]["steps_per_s"]) / d for fw in FRAMEWORKS if fw != "distrib"}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(10, 4.5), constrained_layout=True)
    width = 0.2
    for k, fw in enumerate(FRAMEWORKS):
        rel = [statistics.median(results[n][fw]["steps_per_s"]) / statistics.median(results[n]["hand"]["steps_per_s"]) for n in names]
        lo = [r - min(results[n][fw]["steps_per_s"]) / statistics.median(results[n]["hand"]["steps_per_s"]) for r, n in zip(rel, names)]
        hi = [max(results[n][fw]["steps_per_s"]) / statistics.median(results[n]["hand"]["steps_per_s"]) - r for r, n in zip(rel, names)]
        ax.bar([i + (k - 1.5) * width for i in range(len(names))], rel, width, yerr=[lo, hi], capsize=3, label=fw)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.98, color="k", lw=0.5, ls="--")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("optimizer steps/s relative to the hand-written loop")
    ax.set_ylim(0.5, 1.15)
    ax.legend(ncol=4, loc="lower right")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--name", default=None, help="results file name (default: smoke or the date)")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's dynamic malloc thresholds on (see ALLOCATOR)")
    p.add_argument("--results", type=Path, default=HERE / "results", help="where the .json/.md/.png go")
    ns = p.parse_args(argv)
    check_args(p, "--scenarios", ns.scenarios, SCENARIOS, ns.rounds)
    allocator = {} if ns.default_malloc else ALLOCATOR
    scenarios = SMOKE if ns.smoke else {n: SCENARIOS[n] for n in ns.scenarios.split(",")}
    rounds = 1 if ns.smoke else ns.rounds
    name = ns.name or ("smoke" if ns.smoke else datetime.date.today().isoformat())
    runs = {n: {**{fw: (RUNNERS[fw], []) for fw in FRAMEWORKS}, **({} if ns.smoke else EXTRAS.get(n, {}))} for n in scenarios}
    results: dict = {n: {fw: {"steps_per_s": [], "wall_s": []} for fw in runs[n]} for n in scenarios}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.jsonl"
        for n, (nproc, args) in scenarios.items():
            for r in range(rounds):
                for fw, (runner, extra) in rotated(list(runs[n].items()), r):
                    record, wall = launch(runner, nproc, [*args, *extra], out, allocator)
                    results[n][fw]["steps_per_s"].append(record["steps_per_s"])
                    results[n][fw]["wall_s"].append(wall)
                    print(f"{n} round {r + 1}/{rounds} {fw:10s} {record['steps_per_s']:8.2f} steps/s  {wall:5.1f} s", flush=True)
    dest = ns.results
    dest.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "rounds": rounds,
        "allocator_env": allocator,
        "scenarios": {n: {"nproc": s[0], "args": s[1]} for n, s in scenarios.items()},
    }
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:
        pass
    (dest / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results, "ratio_to_distrib": ratios(results)}, indent=2) + "\n")
    md = table(results)
    if "plain" in results and "plain_1proc" in results:
        one = statistics.median(results["plain_1proc"]["distrib"]["steps_per_s"])
        two = statistics.median(results["plain"]["distrib"]["steps_per_s"])
        md += f"\n\nScaling (distrib, plain, fixed per-process batch): 2 processes {two:.2f} steps/s vs 1 process {one:.2f}: efficiency {two / one:.1%}"
    if "hand_sync_every_micro" in results.get("accum4", {}):
        skip = statistics.median(results["accum4"]["distrib"]["steps_per_s"])
        every = statistics.median(results["accum4"]["hand_sync_every_micro"]["steps_per_s"])
        md += f"\n\nAccumulation (accum4): distrib, one all-reduce per step, {skip:.2f} steps/s vs {every:.2f} with an all-reduce on every micro-batch: {skip / every:.2f}x"
    (dest / f"{name}.md").write_text(md + "\n")
    plot(results, dest / f"{name}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
