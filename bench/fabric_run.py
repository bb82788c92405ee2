"""(d) Lightning Fabric on the CPU: strategy=ddp, no_backward_sync() for gradient accumulation."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch.utils.data import DataLoader
from workload import StepClock, dataset, model, parse_args, report, setup_threads


def main() -> None:
    args = parse_args()
    setup_threads()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fabric = Fabric(accelerator="cpu", strategy="ddp" if world > 1 else "auto", devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    fabric.launch()
    data = dataset(args, world)
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=args.workers))
    net = model(args)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    clock = StepClock(opt)
    net, opt = fabric.setup(net, opt)
    total, step, logged = args.warmup + args.steps, 0, None
    net.train()
    for i, (x, y) in enumerate(loader):
        last = (i + 1) % args.accum == 0
        with fabric.no_backward_sync(net, enabled=not last):
            loss = F.cross_entropy(net(x), y) / args.accum
            fabric.backward(loss)
        if not last:
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_every == 0:
            logged = fabric.all_reduce(loss.detach() * args.accum, reduce_op="mean").item()
            fabric.print(f"step {step} loss {logged:.4f}")
        if step == total:
            break
    report("fabric", args, clock, fabric.global_rank, world, logged)
    fabric.barrier()  # as in hand.py: a clean gloo teardown
    del net, opt
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
