"""(c) HF Accelerate on the CPU: Accelerator(cpu=True), accumulate() for gradient accumulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader
from workload import StepClock, dataset, model, parse_args, report, setup_threads


def main() -> None:
    args = parse_args()
    setup_threads()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=args.accum)
    rank, world = acc.process_index, acc.num_processes
    data = dataset(args, world)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=args.workers)
    net = model(args)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    clock = StepClock(opt)  # the raw optimizer: AcceleratedOptimizer calls it only on sync steps
    net, opt, loader = acc.prepare(net, opt, loader)
    total, step, logged = args.warmup + args.steps, 0, None
    net.train()
    for x, y in loader:
        with acc.accumulate(net):
            loss = F.cross_entropy(net(x), y)
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if not acc.sync_gradients:
            continue
        step += 1
        if step % args.log_every == 0:
            logged = acc.reduce(loss.detach(), reduction="mean").item()
            acc.print(f"step {step} loss {logged:.4f}")
        if step == total:
            break
    report("accelerate", args, clock, rank, world, logged)
    acc.wait_for_everyone()  # as in hand.py: a clean gloo teardown
    del net, opt
    acc.free_memory()  # drops the accelerator's own references to the DDP model
    acc.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
