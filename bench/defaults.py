"""What distrib's defaults cost a whole job (#16): wandb (offline without credentials), step
checkpoints (async by default) and start-up, against the hand-written DDP loop of the same job.

    python bench/defaults.py                 # 1 process and 2 gloo ranks, 5 rotated rounds
    python bench/defaults.py --smoke         # CI: one short round at 2 ranks, checks that every variant runs
    python bench/defaults.py --worlds 2 --variants hand,distrib,distrib_quiet   # an A/B of some variants
    python bench/defaults.py --tables bench/results/NAME.json                   # redo the tables of a run

Each run is a fresh process (`python` for 1, `torchrun` for 2); the driver times the whole process,
the runner reports the time from launch to its first and its last optimizer step and the time inside
its loop. The tail, last step to process exit, is what the end of a job costs: the final checkpoint,
model.pt, the wait for wandb's flush, the teardown.
Writes bench/results/<name>.json, .md (the tables) and .png, and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import ALLOCATOR, check, rotated, spread

HERE = Path(__file__).resolve().parent
QUIET = ["wandb.mode=disabled", "ckpt.every=none"]
# name -> (framework, distrib overrides, job.py flags)
VARIANTS: dict[str, tuple[str, list[str], list[str]]] = {
    "hand": ("hand", [], []),
    "distrib": ("distrib", [], []),  # the defaults: wandb auto (offline here), ckpt.every 100 + epoch ends, async
    "distrib_quiet": ("distrib", QUIET, []),  # no wandb, checkpoints at epoch ends only
    "ckpt10_async": ("distrib", ["wandb.mode=disabled", "ckpt.every=10"], []),
    "ckpt10_sync": ("distrib", ["wandb.mode=disabled", "ckpt.every=10", "ckpt.async=false"], []),
    # The defaults in a script that calls distrib.quick_exit(), as distrib's own commands do: the
    # exit skips Python's collections over torch's objects. Not the defaults' cost: a saving beside it.
    "distrib_quick_exit": ("distrib", [], ["--quick_exit"]),
    # The trackers (#29): none at all, and TensorBoard, MLflow and CSV together in place of wandb, the checkpoints as the defaults'.
    "no_trackers": ("distrib", ["run.report_to=none"], []),
    "trackers": ("distrib", ["run.report_to=tensorboard,mlflow,csv"], []),
}
SMOKE_VARIANTS = ("hand", "distrib", "ckpt10_async", "ckpt10_sync", "distrib_quick_exit")


def launch(nproc: int, variant: str, job_args: list[str], out: Path) -> tuple[dict, float]:
    framework, sets, flags = VARIANTS[variant]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **ALLOCATOR, "BENCH_RESULT": str(out), "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WANDB_API_KEY", None)  # the default a CI machine or a laptop without `wandb login` sees: offline
    head = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    run_dir = tempfile.mkdtemp(dir=out.parent)  # fresh for every launch: nothing to resume
    cmd = [*head, str(HERE / "job.py"), "--framework", framework, "--run_dir", run_dir, *job_args, *flags, *(a for s in sets for a in ("--set", s))]
    out.unlink(missing_ok=True)
    env["BENCH_LAUNCH_T0"] = repr(time.time())
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    check(done, out, variant, peer=framework == "hand")
    return json.loads(out.read_text().splitlines()[-1]), wall


def checkpoints(total: int, epochs: int, every: int) -> int:
    per_epoch = total // epochs
    return len(set(range(every, total + 1, every)) | {per_epoch * e for e in range(1, epochs + 1)})


def tables(results: dict, meta: dict) -> str:
    out = []
    for world, per in results.items():
        hand = per["hand"]
        rows = [
            f"### {world} process{'es' if world != '1' else ''}",
            "",
            "| variant | whole process s (median) | spread | ratio to hand | paired ratio | launch to first step s | minus hand's | loop s "
            "| loop / distrib_quiet | tail s (last step to exit) | minus hand's |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        quiet = statistics.median(per["distrib_quiet"]["loop_s"]) if "distrib_quiet" in per else None
        for name, r in per.items():
            wall, first, loop, tail = (statistics.median(r[k]) for k in ("wall_s", "first_step_s", "loop_s", "tail_s"))
            # Each round's run over the same round's hand run, then the median: the runs of a round are
            # minutes apart, so the VM's slower drift cancels in the pair.
            paired = statistics.median(a / b for a, b in zip(r["wall_s"], hand["wall_s"]))
            rows.append(
                f"| {name} | {wall:.2f} | {spread(r['wall_s']):.1%} | {wall / statistics.median(hand['wall_s']):.3f} | {paired:.3f} | {first:.2f} | "
                f"{first - statistics.median(hand['first_step_s']):+.2f} | {loop:.2f} | {loop / quiet if quiet else float('nan'):.3f} | "
                f"{tail:.2f} | {tail - statistics.median(hand['tail_s']):+.2f} |"
            )
        if quiet and "ckpt10_sync" in per and "ckpt10_async" in per:
            n = checkpoints(meta["steps"][world], meta["epochs"], 10)
            base_excess = statistics.median(per["distrib_quiet"]["excess_s"])
            rows += [
                "",
                f"Step stall per checkpoint, {n} checkpoints. Across runs: loop time above distrib_quiet's, over n. "
                "Within runs: the steps' time beyond the run's own median step, above distrib_quiet's, over n "
                "(the VM's run-to-run drift cancels).",
                "",
                "| variant | across runs ms | within runs ms | loop / distrib_quiet |",
                "|---|---|---|---|",
            ]
            for name in ("ckpt10_sync", "ckpt10_async"):
                loop = statistics.median(per[name]["loop_s"])
                within = (statistics.median(per[name]["excess_s"]) - base_excess) / n * 1e3
                # Within-run cost relative to the loop: what the stall adds to a quiet loop of this run's speed.
                rows.append(
                    f"| {name} | {(loop - quiet) / n * 1e3:.1f} | {within:.1f} | {loop / quiet:.3f} (within runs: {1 + within * n / 1e3 / quiet:.3f}) |"
                )
        out.append("\n".join(rows))
    return "\n\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (world, per) in zip(axes[0], results.items()):
        names = list(per)
        base = statistics.median(per["hand"]["wall_s"])
        ax.bar(names, [statistics.median(per[n]["wall_s"]) / base for n in names], color="tab:blue", label="whole process / hand")
        ax.axhline(1.03, color="tab:red", ls="--", lw=1, label="goal 1.03")
        ax.set_title(f"{world} process(es): whole job, relative to the hand loop")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--variants", default=",".join(VARIANTS), help="a subset, hand always among them")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--name", default=f"defaults-{datetime.date.today()}")
    p.add_argument("--tables", metavar="JSON", help="only print (and rewrite the .md of) the tables of an earlier run's .json")
    args = p.parse_args(argv)
    if args.tables:
        saved = json.loads(Path(args.tables).read_text())
        text = tables(saved["results"], saved["meta"])
        Path(args.tables).with_suffix(".md").write_text(text + "\n")
        print(text)
        return 0
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be at least 1")
    worlds = ["2"] if args.smoke else args.worlds.split(",")
    if any(w not in ("1", "2") for w in worlds):
        p.error(f"--worlds {args.worlds}: choose from 1,2")
    rounds, name = (1, "defaults-smoke") if args.smoke else (args.rounds, args.name)
    names = list(SMOKE_VARIANTS) if args.smoke else ["hand", *(v for v in args.variants.split(",") if v != "hand")]
    if unknown := [v for v in names if v not in VARIANTS]:
        p.error(f"--variants {args.variants}: {', '.join(unknown)} unknown; choose from {','.join(VARIANTS)}")
    epochs, per_epoch = (2, 8) if args.smoke else (2, 256)
    job_args = ["--epochs", str(epochs), "--steps_per_epoch", str(per_epoch)]
    results: dict = {w: {n: {"wall_s": [], "first_step_s": [], "loop_s": [], "excess_s": [], "tail_s": []} for n in names} for w in worlds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for world in worlds:
                for variant in rotated(names, r):  # a machine that drifts penalises no variant
                    record, wall = launch(int(world), variant, job_args, Path(tmp) / "r.jsonl")
                    slot = results[world][variant]
                    slot["wall_s"].append(wall)
                    slot["first_step_s"].append(record["first_step_s"])
                    slot["loop_s"].append(record["loop_s"])
                    slot["excess_s"].append(record["excess_s"])
                    slot["tail_s"].append(wall - record["last_step_s"])
                    print(
                        f"round {r + 1} {world}p {variant}: {wall:.2f} s, first step {record['first_step_s']:.2f} s, loop {record['loop_s']:.2f} s, "
                        f"tail {wall - record['last_step_s']:.2f} s",
                        flush=True,
                    )
    meta = {
        "rounds": rounds,
        "epochs": epochs,
        "steps": {w: epochs * per_epoch for w in worlds},
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "date": str(datetime.datetime.now()),
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = tables(results, meta)
    (out / f"{name}.md").write_text(text + "\n")
    plot(results, out / f"{name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
