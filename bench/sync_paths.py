"""No host sync on any step path (#30): `fit` with `torch.cuda.set_sync_debug_mode("error")` on every step
but the log steps (where the one allowed sync is), over the paths added since the first sync check.

    python bench/sync_paths.py                                  # one GPU: the paths below, under DDP's code path
    torchrun --nproc_per_node=2 bench/sync_paths.py --strategy fsdp   # FSDP2 across GPUs
    python bench/sync_paths.py --selftest                       # a planted .item() in the loss: must be caught

The run: examples/gpt.py's model with a token-weighted loss (`distrib.label_tokens`: the per-step
token count is summed on the device), bf16 autocast, asynchronous checkpoints (ckpt.every a multiple
of the log interval, so the steps while a save is written in the background are checked), and the
non-finite guard in `skip` mode with a fused AdamW (the device-side drop of a step: a non-fused
optimizer reads one flag a step under `skip`, by design, docs/guards.md). The first steps are left out
(lazy initialisation of cuBLAS and the allocator is not the hot path). Prints one JSON line and exits 0
when no checked step synchronised, 1 when one did (the error names the call).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--selftest", action="store_true", help="plant a .item() in the loss: the check must fail")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a one-block model (the CPU smoke: the code path, quickly)")
    args = p.parse_args(argv)
    import torch
    from gpt import GPT, GPTConfig, datasets
    from gpu_feed import guard_syncs

    import distrib

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device: torch.cuda.set_sync_debug_mode needs one"}))
        return 0
    cfg_gpt = GPTConfig(context=32, layers=1, dim=32, heads=2) if args.tiny else GPTConfig(context=128, layers=2, dim=128, heads=4)
    train_set, _ = datasets(cfg_gpt)
    torch.manual_seed(0)
    model = GPT(cfg_gpt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=args.device == "cuda")
    log_every = 5
    if args.device == "cuda":
        guard_syncs(model, opt, start=3, log_every=log_every, total=args.steps)
    items = distrib.label_tokens(shift=False)
    if args.selftest:
        inner = items

        def items(batch):  # noqa: F811 - a host sync on purpose
            count = inner(batch)
            torch.as_tensor(count).sum().item()  # planted
            return count

    error = None
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.environ.get("SYNC_RUN_DIR") or tmp  # torchrun's ranks share one (SYNC_RUN_DIR)
        cfg = distrib.Config().replace(
            **{
                "run.dir": run_dir,
                "run.device": args.device,
                "run.report_to": "none",
                "train.batch_size": 8,
                "train.epochs": 1,
                "train.max_steps": args.steps,
                "train.log_every": log_every,
                "train.precision": "bf16",
                "train.nonfinite": "skip",
                "dist.strategy": args.strategy,
                "ckpt.every": 2 * log_every,
                "ckpt.resume": "never",
            }
        )
        where = None
        try:
            distrib.fit(cfg, model=model, optimizer=opt, train_data=train_set, items=items)
        except RuntimeError as exc:  # the sync debug mode's error, raised at the call that synchronised
            error = f"{type(exc).__name__}: {str(exc)[:500]}"
            frame = traceback.extract_tb(exc.__traceback__)[-1]  # the line that synchronised: the self-test's must be its own
            where = f"{Path(frame.filename).name}:{frame.lineno} {frame.name}: {frame.line}"
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps({"strategy": args.strategy, "selftest": args.selftest, "steps": args.steps, "clean": error is None, "error": error, "where": where}),
            flush=True,
        )
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
