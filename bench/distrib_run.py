"""(b) distrib: the same model, data and optimizer handed to distrib.fit."""

from __future__ import annotations

import os

import torch
from workload import StepClock, dataset, model, parse_args, report, setup_threads, shared_run_dir

import distrib


def main() -> None:
    args = parse_args()
    setup_threads()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    net = model(args)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    clock = StepClock(opt)
    with shared_run_dir() as run_dir:  # one for all ranks: fit checkpoints the last step
        cfg = (
            distrib.Config()
            .replace(
                **{
                    "seed": args.seed,
                    "run.dir": run_dir,
                    "run.device": "cpu",
                    "data.num_workers": args.workers,
                    "train.batch_size": args.batch,
                    "train.grad_accum": args.accum,
                    "train.epochs": 1,
                    "train.max_steps": args.warmup + args.steps,
                    "train.log_every": args.log_every,
                    "ckpt.every": None,
                    "ckpt.resume": "never",
                    "wandb.mode": "disabled",
                }
            )
            .replace(**dict(kv.split("=", 1) for kv in args.distrib_set))
        )
        summary = distrib.fit(cfg, model=net, optimizer=opt, train_data=dataset(args, world))
    report("distrib", args, clock, int(os.environ.get("RANK", "0")), world, summary["eval"].get("loss"))


if __name__ == "__main__":
    main()
