"""DDP against FSDP2 (`dist.strategy`): what each rank holds, and what a step costs.

    python bench/fsdp.py                    # examples/gpt.py's model at 8 x 256, 1 and 2 gloo ranks, 3 rounds
    python bench/fsdp.py --layers 4 --dim 128 --rounds 5
    python bench/fsdp.py --smoke            # CI: one short launch of each, checks they run (no timing asserted)

Each launch is `torchrun --nproc_per_node=N bench/fsdp.py --runner ddp|fsdp ...`: a loop on distrib's
blocks (Session.setup, backward, step) with AdamW on random bytes. Rank 0 reports, for its own rank:
the bytes of parameters, gradients and optimizer state it holds (`distrib.state_bytes`, after
a backward, before zero_grad), the process's peak RSS, the median step time after the warm-up, and
on CUDA the peak allocated memory. At 1 process nothing is wrapped: DDP and FSDP are the same plain
module there, so the 1-process figure is measured once. 2-rank runs alternate (ddp fsdp ddp ...).
Writes bench/results/fsdp-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "examples")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runner", choices=("ddp", "fsdp"), help="(a torchrun worker) which strategy to run")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="windows per process per step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def run_worker(args: argparse.Namespace) -> None:
    import torch
    from gpt import GPT, GPTConfig

    import distrib
    from distrib.parallel.wrap import state_bytes

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = distrib.Config().replace(
            **{"run.dir": run_dir, "run.device": args.device, "dist.strategy": args.runner, "ckpt.resume": "never", "wandb.mode": "disabled"}
        )
        with distrib.Session(cfg) as session:
            torch.manual_seed(0)
            model = GPT(GPTConfig(layers=args.layers, dim=args.dim, context=args.context, heads=max(1, args.dim // 64)))
            n_params = sum(p.numel() for p in model.parameters())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            model, optimizer = session.setup(model, optimizer)
            g = torch.Generator().manual_seed(session.rank)
            data = torch.randint(0, 256, (args.batch, args.context + 1), generator=g).to(session.device)
            times, held = [], {}
            for step in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                loss = model(input_ids=data[:, :-1], labels=data[:, 1:])["loss"]
                session.backward(loss)
                if step == args.warmup:  # AdamW's state exists after the first step; gradients are still here
                    held = state_bytes(model, optimizer)
                session.step(optimizer)
                if session.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            peak_cuda = torch.cuda.max_memory_allocated() if session.device.type == "cuda" else None
            if session.is_rank_zero:
                steady = times[args.warmup :]
                print(
                    "RESULT "
                    + json.dumps(
                        {
                            "strategy": args.runner,
                            "world_size": session.world_size,
                            "params": n_params,
                            "state_bytes": held,
                            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                            "peak_cuda_bytes": peak_cuda,
                            "step_s_median": statistics.median(steady),
                            "step_s_spread": max(steady) - min(steady),
                            "loss": loss.item(),
                            "device": str(session.device) if session.device.type != "cuda" else torch.cuda.get_device_name(),
                        }
                    ),
                    flush=True,
                )


def launch(args: argparse.Namespace, runner: str, nproc: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
        "--runner",
        runner,
        "--layers",
        str(args.layers),
        "--dim",
        str(args.dim),
        "--context",
        str(args.context),
        "--batch",
        str(args.batch),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def table(one: dict, two: dict[str, list[dict]]) -> list[str]:
    rows = [
        "| strategy | ranks | params MiB | grads MiB | optimizer MiB | total MiB | vs 1 rank | peak RSS MiB | step ms (median of rounds) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    b = one["state_bytes"]
    rows.append(
        f"| either | 1 | {_mib(b['params'])} | {_mib(b['grads'])} | {_mib(b['optimizer'])} | {_mib(b['total'])} | 1.00 | "
        f"{_mib(one['peak_rss_bytes'])} | {one['step_s_median'] * 1e3:.1f} |"
    )
    for strategy, results in two.items():
        b = results[0]["state_bytes"]
        ms = [r["step_s_median"] * 1e3 for r in results]
        rows.append(
            f"| {strategy} | 2 | {_mib(b['params'])} | {_mib(b['grads'])} | {_mib(b['optimizer'])} | {_mib(b['total'])} | "
            f"{b['total'] / one['state_bytes']['total']:.2f} | {_mib(statistics.median(r['peak_rss_bytes'] for r in results))} | "
            f"{statistics.median(ms):.1f} (rounds: {', '.join(f'{m:.1f}' for m in ms)}) |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.runner:
        run_worker(args)
        return 0
    if args.smoke:
        args.layers, args.dim, args.warmup, args.steps, args.rounds = 2, 64, 1, 2, 1
    one = launch(args, "ddp", 1)
    two: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
    for _ in range(args.rounds):
        for strategy in two:
            two[strategy].append(launch(args, strategy, 2))
    rows = table(one, two)
    ratio = statistics.median(r["step_s_median"] for r in two["fsdp"]) / statistics.median(r["step_s_median"] for r in two["ddp"])
    print(f"{one['params']:,} parameters ({args.layers} layers x {args.dim}), AdamW, batch {args.batch} x {args.context} per rank, on {one['device']}")
    print("\n".join(rows))
    print(f"FSDP / DDP step time at 2 ranks: {ratio:.2f}x")
    if args.smoke:
        return 0
    stamp = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else HERE / "results" / f"fsdp-{stamp}"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": stamp, "machine": platform.platform(), "cpus": os.cpu_count(), "args": vars(args)}
    out.with_suffix(".json").write_text(json.dumps({**meta, "one": one, "two": two, "fsdp_over_ddp_step": ratio}, indent=2))
    out.with_suffix(".md").write_text(
        f"# DDP vs FSDP, {stamp}\n\n`python bench/fsdp.py {' '.join(sys.argv[1:])}` on {meta['machine']} ({meta['cpus']} CPUs), {one['device']}.\n\n"
        f"{one['params']:,} parameters ({args.layers} layers x {args.dim}), AdamW, batch {args.batch} x {args.context} bytes per rank.\n\n"
        + "\n".join(rows)
        + f"\n\nFSDP / DDP step time at 2 ranks: {ratio:.2f}x\n"
    )
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
