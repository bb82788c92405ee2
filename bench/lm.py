"""The language-model benchmark: examples/gpt.py's model and data, trained by a hand-written DDP loop
(the way nanoGPT writes it) and by `distrib.fit`, same seed, batch, optimizer and steps.

    python bench/lm.py                 # 5 alternating rounds (hand distrib hand distrib ...), 2 gloo ranks
    python bench/lm.py --rounds 7 --steps 150
    python bench/lm.py --smoke         # CI: one short round of each, checks both run (no timing asserted)

Each launch is `torchrun --nproc_per_node=2 bench/lm.py --runner hand|distrib ...`; rank 0 reports the
steady-state step time (between the end of the warm-up and the last step, from the optimizer's own
timestamps), so start-up is excluded. distrib's loss is token-exact: that costs one small count
all-reduce per optimizer step, which the hand loop does not do; it is part of what is measured.
Writes bench/results/lm-<date>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}  # as bench/run.py, see there


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runner", choices=("hand", "distrib", "distrib_mean"), help="(a torchrun worker) which loop to run")
    p.add_argument("--loops", default="hand,distrib", help="the loops to compare: hand, distrib, distrib_mean (per-batch mean loss, no token count)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=16, help="windows per process per step")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=100, help="timed optimizer steps")
    p.add_argument("--log_every", type=int, default=25)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=os.environ.get("BENCH_RESULT", ""))
    p.add_argument(
        "--distrib_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="distrib loops only: a config override, to find what a default costs (e.g. ckpt.async=false)",
    )
    return p.parse_args(argv)


def _cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def run_hand(args: argparse.Namespace) -> None:
    """nanoGPT's shape: DistributedSampler, DDP, AdamW, a LambdaLR schedule, loss.item() at the log interval."""
    import torch
    import torch.distributed as dist
    from gpt import GPT, GPTConfig, datasets
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler
    from workload import StepClock, report

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = GPTConfig()
    train_set, _ = datasets(cfg)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch, sampler=sampler, drop_last=True)
    torch.manual_seed(0)
    model = DDP(GPT(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, 30, total))
    clock = StepClock(opt)
    sampler.set_epoch(0)
    loss_value = None
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % args.log_every == 0:
            loss_value = loss.item()
        if step == total:
            break
    report("hand", args, clock, rank, world, loss_value)
    dist.destroy_process_group()


def run_distrib(args: argparse.Namespace) -> None:
    import torch
    from gpt import GPT, GPTConfig, datasets
    from workload import StepClock, report, shared_run_dir

    import distrib

    torch.set_num_threads(1)
    cfg_gpt = GPTConfig()
    train_set, _ = datasets(cfg_gpt)
    torch.manual_seed(0)
    model = GPT(cfg_gpt)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, 30, total))
    clock = StepClock(opt)
    with shared_run_dir() as run_dir:  # one for all ranks: fit checkpoints the last step
        cfg = (
            distrib.Config()
            .replace(
                **{
                    "run.dir": run_dir,
                    "run.device": "cpu",
                    "train.batch_size": args.batch,
                    "train.epochs": 1,
                    "train.max_steps": total,
                    "train.log_every": args.log_every,
                    "data.drop_last": True,
                    "ckpt.every": None,
                    "ckpt.resume": "never",
                    "wandb.mode": "disabled",
                }
            )
            .replace(**dict(kv.split("=", 1) for kv in args.distrib_set))
        )
        # distrib_mean: each micro-batch's own mean loss, as the hand loop has it (no token count, no extra all-reduce).
        items = None if args.runner == "distrib_mean" else distrib.label_tokens(shift=False)
        summary = distrib.fit(
            cfg,
            model=model,
            optimizer=opt,
            scheduler=sched,
            train_data=train_set,
            items=items,
            step_fn=(lambda m, b: m(**b)["loss"]) if items is None else None,
        )
    report(args.runner, args, clock, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), summary["eval"].get("loss"))


def launch(runner: str, args: argparse.Namespace, out: Path) -> dict:
    from run import check

    env = {**os.environ, "OMP_NUM_THREADS": "1", **ALLOCATOR, "BENCH_RESULT": str(out)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).resolve()),
        "--runner",
        runner,
        "--batch",
        str(args.batch),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--log_every",
        str(args.log_every),
        *[f"--distrib_set={kv}" for kv in args.distrib_set],
    ]
    out.unlink(missing_ok=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    check(done, out, runner, peer=runner == "hand")
    return json.loads(out.read_text().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.runner == "hand":
        run_hand(args)
        return 0
    if args.runner in ("distrib", "distrib_mean"):
        run_distrib(args)
        return 0
    if args.smoke:
        args.rounds, args.warmup, args.steps, args.log_every = 1, 2, 6, 3
    from run import rotated

    loops = args.loops.split(",")
    step_s: dict[str, list[float]] = {name: [] for name in loops}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for runner in rotated(loops, r):  # alternating, rotated: drift of the machine hits both alike
                rec = launch(runner, args, Path(tmp) / f"{runner}.jsonl")
                step_s[runner].append(1.0 / rec["steps_per_s"])
                print(f"round {r + 1}/{args.rounds} {runner:8s} {1000 / rec['steps_per_s']:.2f} ms/step", flush=True)
    head = "distrib" if "distrib" in step_s else next(name for name in loops if name != "hand")
    ratios = [d / h for d, h in zip(step_s[head], step_s["hand"])]
    others = {name: [x / h for x, h in zip(v, step_s["hand"])] for name, v in step_s.items() if name not in ("hand", head)}
    result = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "processes": 2,
        "backend": "gloo",
        "batch_per_process": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "step_s": step_s,
        "ratio_per_round": ratios,
        "median_ms": {k: 1000 * statistics.median(v) for k, v in step_s.items()},
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "other_ratios_median": {k: statistics.median(v) for k, v in others.items()},
    }
    table = (
        "| loop | median ms/step | min | max |\n|---|---|---|---|\n"
        + "".join(f"| {k} | {1000 * statistics.median(v):.2f} | {1000 * min(v):.2f} | {1000 * max(v):.2f} |\n" for k, v in step_s.items())
        + f"\n{head} / hand step time: median {result['ratio_median']:.3f} (rounds: {', '.join(f'{x:.3f}' for x in ratios)})\n"
        + "".join(f"{k} / hand step time: median {statistics.median(v):.3f} (rounds: {', '.join(f'{x:.3f}' for x in v)})\n" for k, v in others.items())
    )
    print(table)
    if args.smoke:
        return 0
    stem = HERE / "results" / f"lm-{result['date']}"
    stem.parent.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    _plot(step_s, ratios, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md, .png")
    return 0


def _plot(step_s: dict[str, list[float]], ratios: list[float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name, values in step_s.items():
        a.plot(range(1, len(values) + 1), [1000 * v for v in values], "o-", label=name)
    a.set(title="GPT on stdlib bytes, 2 gloo ranks: step time", xlabel="round", ylabel="ms / step")
    a.legend()
    b.plot(range(1, len(ratios) + 1), ratios, "o-")
    b.axhline(1.02, linestyle="--", color="grey", label="goal 1.02")
    b.set(title="distrib / hand", xlabel="round")
    b.legend()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
