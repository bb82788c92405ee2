"""(a) The loop people write by hand: DistributedSampler + DDP, no_sync for accumulation, loss printed every N steps."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from workload import StepClock, dataset, model, parse_args, report, setup_threads


def main() -> None:
    args = parse_args()
    setup_threads()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = dataset(args, world)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, num_workers=args.workers)
    net = DDP(model(args))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    clock = StepClock(opt)
    total, step, logged = args.warmup + args.steps, 0, None
    sampler.set_epoch(0)
    net.train()
    for i, (x, y) in enumerate(loader):
        last = (i + 1) % args.accum == 0
        with contextlib.nullcontext() if last or args.sync_every_micro else net.no_sync():
            loss = F.cross_entropy(net(x), y) / args.accum
            loss.backward()
        if not last:
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_every == 0:
            value = loss.detach() * args.accum
            dist.all_reduce(value)
            logged = value.item() / world
            if rank == 0:
                print(f"step {step} loss {logged:.4f}", flush=True)
        if step == total:
            break
    report("hand_sync_every_micro" if args.sync_every_micro else "hand", args, clock, rank, world, logged)
    # Clean gloo teardown (torch 2.13): all ranks past their last collective, then the DDP reducer
    # before the process group; otherwise a rank can abort at exit ("terminate called without an active exception").
    dist.barrier()
    del net
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
