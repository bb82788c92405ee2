"""examples/digits.py written as your own loop on distrib's public blocks (Lightning Fabric style).

    python examples/own_loop.py
    torchrun --nproc_per_node=2 examples/own_loop.py --train.epochs 20
    srun --ntasks=2 python examples/own_loop.py

The lines marked `# distrib` are the ones that differ from a plain single-process PyTorch loop.
With the same flags it ends at the same parameters as digits.py (`fit` is this loop, with logging).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from digits import DEFAULTS, DigitsConfig, datasets, make_model

import distrib


def train(cfg: distrib.Config) -> dict | int:
    with distrib.Session(cfg) as session:  # distrib: process group, device, signals
        train_set, test_set = datasets(cfg.digits, cfg.seed)
        model = make_model(cfg.digits, cfg.seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.digits.lr, momentum=cfg.digits.momentum)
        model, optimizer = session.setup(model, optimizer)  # distrib: device, DDP or FSDP
        session.seed_everything()  # distrib: per-rank seeds, as fit does
        train_loader = session.train_loader(train_set)  # distrib: instead of DataLoader(shuffle=True)
        test_loader = session.eval_loader(test_set)  # distrib: every test sample once over all ranks
        state = {"model": model, "optimizer": optimizer, "train": train_loader}
        session.load(state)  # distrib: resume from run.dir's newest checkpoint, if any

        def evaluate() -> dict:
            model.eval()
            metrics = distrib.Metrics(session.device)  # distrib: exact global means
            with torch.no_grad():
                for inputs, labels in test_loader:
                    logits = model(inputs)
                    correct = (logits.argmax(1) == labels).sum()
                    metrics.add({"loss": F.cross_entropy(logits, labels), "accuracy": (correct, len(labels))}, weight=len(labels))
                    metrics.add_total("count", len(labels))
                for _ in range(test_loader.filler_batches):  # distrib: FSDP needs as many forwards on every rank
                    model(inputs)
            return metrics.compute()  # one all-reduce

        result: dict = {}
        while train_loader.epoch < cfg.train.epochs:  # for epoch in range(epochs)
            model.train()
            for mb in train_loader:  # distrib: micro-batches (train.grad_accum) on the device
                inputs, labels = mb.batch
                with session.no_backward_sync(model, enabled=not mb.last):  # distrib: one all-reduce a step
                    loss = F.cross_entropy(model(inputs), labels)
                    session.backward(loss * mb.weight)  # distrib: exact weight of this micro-batch in the step
                if mb.last:
                    session.step(optimizer)  # distrib: clip, step, zero_grad
                    # distrib: a signal (SIGTERM, SIGUSR1, SIGHUP, Ctrl-C) on any rank: every rank stops at the same
                    # step. should_stop() is a collective, so ask at an interval, not every step.
                    if train_loader.step % cfg.train.log_every == 0 and session.should_stop():
                        session.save(state)
                        return distrib.EXIT_STOPPED  # the session writes stopped.json; distrib.main exits 75

            result = evaluate()
            session.log({"epoch": train_loader.current_epoch, **result}, kind="eval")  # rank 0: metrics.jsonl and the console
            session.save(state)  # distrib: atomic, verified checkpoint

        result = result or evaluate()  # a rerun of a finished run trains nothing: evaluate what it has
        summary = {"eval": result, "optimizer_steps": train_loader.step, "world_size": session.world_size, "params_sha256": distrib.params_sha256(model)}
        session.save_model(model)  # model.pt: the plain module's keys
        session.write_json("summary.json", summary)
        if session.is_main_process:  # also session.rank, session.world_size
            print(f"eval accuracy {result.get('accuracy', float('nan')):.4f} on {result.get('count', 0)} digits")
        return summary


if __name__ == "__main__":
    sys.exit(distrib.main(train, sections={"digits": DigitsConfig}, defaults={**DEFAULTS, "run.dir": "runs/own_loop"}))
