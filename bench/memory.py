"""Memory and multi-node sharding: activation checkpointing, HSDP and CPU offload, measured.

    python bench/memory.py            # examples/gpt.py's model, 4 blocks of 128; contexts 128-1024; 4 gloo ranks
    python bench/memory.py --smoke    # tiny: the activations part and HSDP's count once, no numbers kept

Parts:

- **activations** (one process): for `train.activation_checkpointing` none, full and selective, the
  activation bytes one micro-batch's forward leaves for its backward (`distrib.ActivationBytes`:
  `held`, every storage the forward made that is still alive, and `saved`, what autograd's
  saved-tensor hooks see), and the median time of a whole training step (forward, backward, AdamW)
  at a few context lengths. Dropout 0.1: the recompute draws the same masks.
- **mesh** (4 ranks under torchrun, `--runner`): the collectives a training step of the same model
  issues under FSDP over 4 ranks, HSDP 2 x 2 and FSDP with CPU offload, counted per optimizer step
  (accumulating 2 micro-batches) from the profiler's `c10d::` ops, with their payload bytes; and
  where each rank's parameters, gradients and AdamW state live (`state_bytes` by device).

Writes bench/results/memory-<date>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("none", "full", "selective")
LAYOUTS = {"fsdp": [], "hsdp": ["dist.replicate=2"], "offload": ["dist.fsdp_offload=true"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runner", choices=tuple(LAYOUTS), help="(a torchrun worker) which layout to count")
    p.add_argument("--contexts", default="128,256,512,1024")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode and context (after 2 warm-up steps)")
    p.add_argument("--out", default="")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.contexts, args.layers, args.dim, args.batch, args.steps = "32", 2, 32, 2, 1
    return args


def _gpt(args: argparse.Namespace, context: int, dropout: float = 0.1):  # noqa: ANN202 (torch is imported lazily)
    sys.path.insert(0, str(HERE.parent / "examples"))
    from gpt import GPT, GPTConfig

    return GPT(GPTConfig(context=context, layers=args.layers, dim=args.dim, heads=4, dropout=dropout))


def activations(args: argparse.Namespace) -> list[dict]:
    import torch

    from distrib import ActivationBytes
    from distrib.parallel import activations as ac
    from distrib.parallel.fsdp import find_blocks

    torch.set_num_threads(2)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        g = torch.Generator().manual_seed(0)
        x, y = (torch.randint(0, 256, (args.batch, context), generator=g) for _ in range(2))
        for mode in MODES:
            torch.manual_seed(0)
            model = _gpt(args, context)
            ac.apply(find_blocks(model), mode)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            with ActivationBytes(model) as counted:
                loss = model(x, y)["loss"]
            loss.backward()
            opt.zero_grad()
            times = []
            for i in range(2 + args.steps):
                start = time.perf_counter()
                model(x, y)["loss"].backward()
                opt.step()
                opt.zero_grad()
                if i >= 2:
                    times.append(time.perf_counter() - start)
            rows.append({"context": context, "mode": mode, "held": counted.held, "saved": counted.saved, "step_s": statistics.median(times)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_worker(args: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import distrib
    from distrib.runtime.collectives import all_gather_object

    torch.set_num_threads(1)
    context = 128 if not args.smoke else 32
    dotted = {"run.device": "cpu", "wandb.mode": "disabled", "dist.strategy": "fsdp", "train.grad_accum": 2, "train.batch_size": args.batch}
    dotted |= {k: (v == "true" if v in ("true", "false") else int(v)) for k, v in (kv.split("=") for kv in LAYOUTS[args.runner])}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = distrib.Config().replace(**{"run.dir": tmp, **dotted})
        with distrib.Session(cfg) as session:
            torch.manual_seed(0)
            model = _gpt(args, context)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            model, optimizer = session.setup(model, optimizer)
            g = torch.Generator().manual_seed(session.rank)
            x, y = (torch.randint(0, 256, (args.batch, context), generator=g) for _ in range(2))

            def step() -> None:
                for micro in range(2):
                    with session.no_backward_sync(model, enabled=micro == 0):
                        session.backward(model(x, y)["loss"])
                session.step(optimizer)

            step()  # warm-up: FSDP's lazy init, AdamW's state
            steps = 3
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(steps):
                    step()
            ops = _collectives(prof.events(), steps)
            model(x, y)["loss"].backward()  # gradients present, for the state count
            where: dict[str, int] = {}
            for t in [*model.parameters(), *(p.grad for p in model.parameters()), *(v for s in optimizer.state.values() for v in s.values())]:
                if isinstance(t, torch.Tensor):
                    local = t.to_local() if hasattr(t, "to_local") else t
                    where[local.device.type] = where.get(local.device.type, 0) + local.numel() * local.element_size()
            ranks = all_gather_object({"ops": ops, "where": where})
            if session.rank == 0:
                Path(args.out).write_text(
                    json.dumps({"ranks": ranks, "mesh": str(session.world_size), "params": sum(p.numel() for p in _gpt(args, context).parameters())})
                )


def _collectives(events: list, steps: int) -> dict[str, dict[str, float]]:
    """`{op: {count, bytes}}` per step from the profiler's `c10d::` ops. An all_reduce (a list of tensors) records no
    shapes: its payload is gloo's all_reduce events' less the reduce-scatters', which gloo carries out as all_reduces."""
    ops: dict[str, dict[str, float]] = {}
    for e in events:
        if e.name.startswith("c10d::") and e.name != "c10d::barrier":
            o = ops.setdefault(e.name.removeprefix("c10d::").strip("_"), {"count": 0, "bytes": 0})
            o["count"] += 1 / steps
            o["bytes"] += max((_numel(s) for s in e.input_shapes), default=0) * 4 / steps  # fp32 throughout
    if "allreduce" in ops and not ops["allreduce"]["bytes"]:
        gloo = sum(_numel(s) for e in events if e.name == "gloo:all_reduce" for s in e.input_shapes) * 4 / steps
        ops["allreduce"]["bytes"] = gloo - ops.get("reduce_scatter_base", {}).get("bytes", 0)
    return ops


def _numel(shape: list) -> int:
    if shape and isinstance(shape[0], list):  # a list of tensors
        return sum(_numel(s) for s in shape)
    n = 1
    for d in shape:
        n *= d
    return n if shape else 0


def mesh(args: argparse.Namespace, work: Path) -> list[dict]:
    rows = []
    for layout in ("hsdp",) if args.smoke else LAYOUTS:
        out = work / f"{layout}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(HERE / "memory.py"), "--runner", layout]
        cmd += ["--layers", str(args.layers), "--dim", str(args.dim), "--batch", str(args.batch), "--out", str(out)] + (["--smoke"] if args.smoke else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"{layout} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        r = json.loads(out.read_text())
        rank0 = r["ranks"][0]
        rows.append({"layout": layout, "params": r["params"], "ops": rank0["ops"], "where": rank0["where"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.runner:
        run_worker(args)
        return 0
    acts = activations(args)
    with tempfile.TemporaryDirectory() as tmp:
        layouts = mesh(args, Path(tmp))
    if args.smoke:
        return 0
    import torch

    stamp = datetime.date.today().isoformat()
    meta = {"date": stamp, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(), "torch": torch.__version__}
    out = HERE / "results" / f"memory-{stamp}"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "activations": acts, "mesh": layouts, "args": vars(args)}, indent=2))
    lines = [
        f"Model: examples/gpt.py, {args.layers} blocks of {args.dim}, 4 heads, dropout 0.1, batch {args.batch}; one process, 2 threads "
        f"({meta['machine']}, torch {meta['torch']}). Held: the bytes of every storage one forward made that are still alive when its "
        "backward starts; saved: those autograd's saved-tensor hooks see (checkpointing hides its own from them). Step: forward, "
        f"backward and AdamW, median of {args.steps}.",
        "",
        "| context | mode | held MB | held / none | saved MB | step ms | step / none |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in acts:
        base = next(b for b in acts if b["context"] == r["context"] and b["mode"] == "none")
        lines.append(
            f"| {r['context']} | {r['mode']} | {r['held'] / 2**20:.1f} | {r['held'] / base['held']:.2f} | {r['saved'] / 2**20:.1f} | "
            f"{r['step_s'] * 1e3:.0f} | {r['step_s'] / base['step_s']:.2f} |"
        )
    names = sorted({k for r in layouts for k in r["ops"]})
    lines += [
        "",
        f"Collectives per optimizer step (2 micro-batches, no sync on the first) at 4 gloo ranks, rank 0, from the profiler's c10d ops: "
        f"count and payload MB (the whole tensor each op gathers or reduces; model {layouts[0]['params'] * 4 / 2**20:.1f} MB fp32). "
        "State: this rank's parameters, gradients and AdamW state, by the device they live on.",
        "",
        "| layout | " + " | ".join(names) + " | state by device (MB) |",
        "|---|" + "---|" * len(names) + "---|",
    ]
    for r in layouts:
        cells = [f"{r['ops'][n]['count']:.0f} / {r['ops'][n]['bytes'] / 2**20:.2f}" if n in r["ops"] else "-" for n in names]
        where = ", ".join(f"{d} {b / 2**20:.2f}" for d, b in sorted(r["where"].items()))
        lines.append(f"| {r['layout']} | " + " | ".join(cells) + f" | {where} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(acts, out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (held, step) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        pts = sorted((r["context"], r["held"] / 2**20, r["step_s"] * 1e3) for r in rows if r["mode"] == mode)
        held.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        step.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=mode)
    for ax, label in ((held, "activation MB held for backward"), (step, "training step ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("train.activation_checkpointing on examples/gpt.py (one process, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
