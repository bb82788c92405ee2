"""The language-model benchmark: examples/gpt.py's model and data, trained by a hand-written DDP loop
(the way nanoGPT writes it) and by `distrib.fit`, same seed, batch, optimizer and steps.

    python bench/lm.py                 # 5 alternating rounds (hand distrib hand distrib ...), 2 gloo ranks
    python bench/lm.py --rounds 7 --steps 150
    python bench/lm.py --smoke         # CI: one short round of each, checks both run (no timing asserted)
    python bench/lm.py --device cuda --nproc 1 --size gpu --precision bf16 --compile   # the GPU half (bench/gpu.py runs it)

Each launch is `torchrun --nproc_per_node=2 bench/lm.py --runner hand|distrib ...`; rank 0 reports the
steady-state step time (between the end of the warm-up and the last step, from the optimizer's own
timestamps), so start-up is excluded. distrib's loss is token-exact: that costs one small count
all-reduce per optimizer step, which the hand loop does not do; it is part of what is measured.
Tokens/s, the data-wait fraction (the share of a step spent waiting for the next batch) and, given
the device's peak FLOP/s (--peak_flops), MFU from the model's declared FLOPs per token are reported
for both loops. The same code runs on the CPU: bf16 autocast and torch.compile work there too.
Writes bench/results/lm-<date>.json, .md and .png (or --name).
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
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}  # as bench/run.py, see there
SIZES = {
    "tiny": {"context": 32, "layers": 1, "dim": 32, "heads": 2},  # CI's smoke: compiles in seconds
    "default": {},  # examples/gpt.py's defaults: a few ms a step on a CPU core
    "gpu": {"context": 1024, "layers": 12, "dim": 768, "heads": 12},  # GPT-2 small's shape: tens of ms a step on an H100 in bf16
}


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
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--nproc", type=int, default=2, help="processes (gloo on the CPU, NCCL on CUDA: one GPU each)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast in both loops")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both loops")
    p.add_argument("--size", choices=tuple(SIZES), default="default", help="the GPT: " + "; ".join(f"{k}: {v}" for k, v in SIZES.items()))
    p.add_argument("--peak_flops", type=float, default=None, help="one device's peak FLOP/s at this precision, for MFU")
    p.add_argument("--name", default=None, help="the results' file name (default lm-<date>)")
    p.add_argument("--results", default=str(HERE / "results"))
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


def _gpt_config(args: argparse.Namespace) -> Any:
    from gpt import GPTConfig

    return GPTConfig(**{**SIZES[args.size], **json.loads(os.environ.get("BENCH_GPT", "{}"))})  # BENCH_GPT: bench/gpu.py's search


def _device(args: argparse.Namespace) -> Any:
    import torch

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync_at(opt: Any, device: Any, steps: set[int]) -> None:
    """On CUDA, wait for the device after the optimizer steps the clock's interval starts and ends at (StepClock,
    installed after this, timestamps after the wait): the host runs ahead of the GPU otherwise."""
    import torch

    if device.type != "cuda":
        return
    inner, count = opt.step, [0]

    def step(*a: Any, **k: Any) -> Any:
        out = inner(*a, **k)
        count[0] += 1
        if count[0] in steps:
            torch.cuda.synchronize(device)
        return out

    opt.step = step


def run_hand(args: argparse.Namespace) -> None:
    """nanoGPT's shape: DistributedSampler, DDP (with more than one process), torch.compile, bf16 autocast,
    pinned batches copied non_blocking, AdamW, a LambdaLR schedule, loss.item() at the log interval."""
    import torch
    import torch.distributed as dist
    from gpt import GPT, datasets
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler
    from workload import StepClock

    torch.set_num_threads(1)
    device = _device(args)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = _gpt_config(args)
    train_set, _ = datasets(cfg)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch, sampler=sampler, drop_last=True, pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    flops_per_token = model.flops_per_token()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    _sync_at(opt, device, {args.warmup, args.warmup + args.steps})
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, 30, total))
    clock = StepClock(opt)
    sampler.set_epoch(0)
    loss_value = None
    waited, it = [], iter(loader)
    for step in range(1, total + 1):
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
        waited.append(time.perf_counter() - t0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(**batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % args.log_every == 0:
            loss_value = loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    timed = clock.times[args.warmup - 1 :]
    wait = sum(waited[args.warmup :]) / (timed[-1] - timed[0])
    _report("hand", args, clock, rank, world, loss_value, cfg, flops_per_token, wait, device)
    dist.destroy_process_group()


def _report(
    name: str, args: argparse.Namespace, clock: Any, rank: int, world: int, loss: Any, cfg: Any, flops_per_token: int, wait: float, device: Any
) -> None:
    """Rank 0's line: steps/s and tokens/s over the timed steps, the data wait, MFU (with --peak_flops), peak memory."""
    import torch

    if rank != 0 or not args.out:
        return
    steps_per_s = clock.steps_per_s(args.warmup)
    tokens_per_s = steps_per_s * args.batch * cfg.context * world
    mfu = tokens_per_s * flops_per_token / (args.peak_flops * world) if args.peak_flops else None
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    record = {"framework": name, "world_size": world, "steps": len(clock.times), "steps_per_s": steps_per_s, "tokens_per_s": tokens_per_s}
    record.update({"mfu": mfu, "data_wait_frac": wait, "peak_mem_bytes": peak, "flops_per_token": flops_per_token, "loss": loss})
    with open(Path(args.out), "a") as f:
        f.write(json.dumps(record) + "\n")


def run_distrib(args: argparse.Namespace) -> None:
    import torch
    from gpt import GPT, datasets
    from workload import StepClock, shared_run_dir

    import distrib

    torch.set_num_threads(1)
    device = _device(args)
    cfg_gpt = _gpt_config(args)
    train_set, _ = datasets(cfg_gpt)
    torch.manual_seed(0)
    model = GPT(cfg_gpt)
    flops_per_token = model.flops_per_token()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    _sync_at(opt, device, {args.warmup, args.warmup + args.steps})
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, 30, total))
    clock = StepClock(opt)
    with shared_run_dir() as run_dir:  # one for all ranks: fit checkpoints the last step
        cfg = (
            distrib.Config()
            .replace(
                **{
                    "run.dir": run_dir,
                    "run.device": args.device,
                    "train.batch_size": args.batch,
                    "train.epochs": 1,
                    "train.max_steps": total,
                    "train.log_every": args.log_every,
                    "train.precision": args.precision,
                    "train.compile": args.compile,
                    "data.drop_last": True,
                    "ckpt.every": None,
                    "ckpt.resume": "never",
                    "run.report_to": "none",
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
        # The data wait of the log intervals after the warm-up, as fit measured it (averaged over ranks).
        lines = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()] if int(os.environ.get("RANK", "0")) == 0 else []
        waits = [r["data_wait_frac"] for r in lines if r["kind"] == "train" and r["step"] - args.log_every >= args.warmup] or [float("nan")]
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    _report(args.runner, args, clock, rank, world, summary["eval"].get("loss"), cfg_gpt, flops_per_token, statistics.mean(waits), device)


def launch(runner: str, args: argparse.Namespace, out: Path) -> dict:
    from run import check

    env = {**os.environ, "OMP_NUM_THREADS": "1", **ALLOCATOR, "BENCH_RESULT": str(out)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
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
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--size",
        args.size,
        *(["--compile"] if args.compile else []),
        *([f"--peak_flops={args.peak_flops}"] if args.peak_flops else []),
        *[f"--distrib_set={kv}" for kv in args.distrib_set],
    ]
    out.unlink(missing_ok=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
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
    records: dict[str, list[dict]] = {name: [] for name in loops}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for runner in rotated(loops, r):  # alternating, rotated: drift of the machine hits both alike
                rec = launch(runner, args, Path(tmp) / f"{runner}.jsonl")
                step_s[runner].append(1.0 / rec["steps_per_s"])
                records[runner].append(rec)
                print(f"round {r + 1}/{args.rounds} {runner:8s} {1000 / rec['steps_per_s']:.2f} ms/step {rec['tokens_per_s']:,.0f} tokens/s", flush=True)
    head = "distrib" if "distrib" in step_s else next(name for name in loops if name != "hand")
    hand = step_s.get("hand", step_s[head])  # without the hand loop (bench/gpu.py's scaling runs): ratios of 1
    ratios = [d / h for d, h in zip(step_s[head], hand)]
    others = {name: [x / h for x, h in zip(v, hand)] for name, v in step_s.items() if name not in ("hand", head)}
    result = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "processes": args.nproc,
        "device": args.device,
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "precision": args.precision,
        "compile": args.compile,
        "size": args.size,
        "gpt": SIZES[args.size],
        "peak_flops": args.peak_flops,
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
        "tokens_per_s": {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in records.items()},
        "tokens_per_s_ratio": statistics.median(b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(records.get("hand", records[head]), records[head])),
        "mfu": {k: (statistics.median(r["mfu"] for r in v) if v[0]["mfu"] is not None else None) for k, v in records.items()},
        "data_wait_frac": {k: statistics.median(r["data_wait_frac"] for r in v) for k, v in records.items()},
        "peak_mem_bytes": {k: v[0]["peak_mem_bytes"] for k, v in records.items()},
        "flops_per_token": records[head][0]["flops_per_token"],
    }
    table = (
        "| loop | median ms/step | min | max |\n|---|---|---|---|\n"
        + "".join(f"| {k} | {1000 * statistics.median(v):.2f} | {1000 * min(v):.2f} | {1000 * max(v):.2f} |\n" for k, v in step_s.items())
        + f"\n{head} / hand tokens/s: median {result['tokens_per_s_ratio']:.3f}; "
        + "; ".join(
            f"{k}: {t:,.0f} tokens/s, data wait {result['data_wait_frac'][k]:.1%}, MFU {_pct(result['mfu'][k])}" for k, t in result["tokens_per_s"].items()
        )
        + f"\n{head} / hand step time: median {result['ratio_median']:.3f} (rounds: {', '.join(f'{x:.3f}' for x in ratios)})\n"
        + "".join(f"{k} / hand step time: median {statistics.median(v):.3f} (rounds: {', '.join(f'{x:.3f}' for x in v)})\n" for k, v in others.items())
    )
    print(table)
    if args.out:  # a driver (bench/gpu.py) takes the result, and writes its own files
        Path(args.out).write_text(json.dumps(result) + "\n")
        return 0
    if args.smoke and not args.name:
        return 0
    stem = Path(args.results) / (args.name or f"lm-{result['date']}")
    stem.parent.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    _plot(step_s, ratios, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md, .png")
    return 0


def _pct(x: float | None) -> str:
    return "n/a (no --peak_flops)" if x is None else f"{x:.1%}"


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
