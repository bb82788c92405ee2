"""A whole training job, as a user runs it: the hand-written DDP loop, or distrib.fit with its defaults.

    python bench/job.py --framework hand|distrib [--set KEY=VALUE ...]        # one process
    torchrun --nproc_per_node=2 bench/job.py --framework distrib               # 2 ranks

The benchmark's MLP, `--epochs` over `--steps_per_epoch` optimizer steps (per world size). Rank 0
appends one JSON line: seconds from launch (BENCH_LAUNCH_T0, the driver's clock) to the first
optimizer step and to the last one, and seconds inside the training loop (distrib: `summary.wall_time_s`, the time in fit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from workload import StepClock, Synthetic, model, setup_threads


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--framework", choices=("hand", "distrib"), required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps_per_epoch", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="distrib only: a config override")
    p.add_argument("--quick_exit", action="store_true", help="distrib only: call distrib.quick_exit() first, as distrib's own commands do")
    p.add_argument("--run_dir", required=True, help="shared by the ranks (checkpoints are written by all of them)")
    p.add_argument("--out", default=os.environ.get("BENCH_RESULT", ""))
    return p.parse_args(argv)


def hand(args: argparse.Namespace, data: Synthetic, net: torch.nn.Module, run_dir: str) -> float:
    """The loop people write: DistributedSampler, DDP, AdamW, loss all-reduced every 50 steps, model.pt at the end."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler)
    ddp = DDP(net) if world > 1 else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    global CLOCK
    CLOCK = StepClock(opt)
    started, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0:
                value = loss.detach().clone()
                if world > 1:
                    dist.all_reduce(value)
                if rank == 0:
                    print(f"step {step} loss {value.item() / world:.4f}", flush=True)
    loop_s = time.perf_counter() - started
    if rank == 0:
        torch.save(net.state_dict(), os.path.join(run_dir, "model.pt"))
    if world > 1:
        dist.barrier()
        del ddp
        dist.destroy_process_group()
    return loop_s


def run_distrib(args: argparse.Namespace, data: Synthetic, net: torch.nn.Module, run_dir: str) -> float:
    import distrib

    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    global CLOCK
    CLOCK = StepClock(opt)
    # distrib's defaults (wandb auto: offline without credentials, a checkpoint every 100 steps and at
    # each epoch end, async); only what the job itself fixes is set.
    cfg = distrib.Config().replace(
        **{
            "seed": args.seed,
            "run.dir": run_dir,
            "run.device": "cpu",
            "train.batch_size": args.batch,
            "train.epochs": args.epochs,
            **dict(kv.split("=", 1) for kv in args.set),
        }
    )
    return distrib.fit(cfg, model=net, optimizer=opt, train_data=data)["wall_time_s"]


CLOCK: StepClock | None = None


def excess(times: list[float]) -> float:
    """Seconds the run's steps took beyond its own median step: the stalls (checkpoints, logging, epoch
    ends), measured inside one run, so the VM's drift from run to run (several % here) cancels out."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    median = statistics.median(gaps)
    return sum(g - median for g in gaps)


def main() -> None:
    args = parse()
    if args.quick_exit:
        import distrib

        distrib.quick_exit()
    setup_threads()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = Synthetic(args.steps_per_epoch * args.batch * world, args.dim, 10, args.seed, 0)
    net = model(args)
    loop_s = (hand if args.framework == "hand" else run_distrib)(args, data, net, args.run_dir)
    assert CLOCK is not None
    if int(os.environ.get("RANK", "0")) == 0 and args.out:
        t0 = float(os.environ.get("BENCH_LAUNCH_T0", "nan"))
        record = {
            "framework": args.framework,
            "set": args.set,
            "world_size": world,
            "steps": len(CLOCK.times),
            "first_step_s": CLOCK.first_wall - t0,
            "last_step_s": CLOCK.first_wall - t0 + CLOCK.times[-1] - CLOCK.times[0],
            "loop_s": loop_s,
            "excess_s": excess(CLOCK.times),
            "median_step_s": statistics.median(b - a for a, b in zip(CLOCK.times, CLOCK.times[1:])),
        }
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
