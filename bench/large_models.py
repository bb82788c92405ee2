"""Large and pretrained models: what each way into a run costs a rank in host memory and time.

    python bench/large_models.py                 # a ~270 MB model (1024 wide, 64 blocks), 1, 2 and 4 gloo ranks
    python bench/large_models.py --depth 16      # smaller
    python bench/large_models.py --smoke         # a tiny model, each path once at 1 and 2 ranks, no numbers checked

Paths, each a `torchrun --nproc_per_node=N bench/large_models.py --runner PATH` launch:

- `eager-ddp`, `eager-fsdp`: the model built on the CPU, then `session.setup`;
- `meta-ddp`, `meta-fsdp`: built on the meta device, allocated and initialised by `session.setup`;
- `load-fsdp`: `meta-fsdp`, then `session.load_weights` from a sharded safetensors directory;
- `export`: `distrib export --format safetensors` of a 2-rank FSDP checkpoint of the model, in one process.

Each rank measures its peak resident memory (VmHWM, reset just before the model is built; FSDP's
one-time ~33 MB of code and mesh is paid before the reset) and the seconds from the build to the end
of setup (and the load). Rank 0 gathers every rank's numbers; the table shows the largest rank.
Writes bench/results/large-models-<date>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATHS = ("eager-ddp", "meta-ddp", "eager-fsdp", "meta-fsdp", "load-fsdp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runner", choices=PATHS, help="(a torchrun worker) which path to measure")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--weights", default="", help="(a worker) the safetensors directory load-fsdp reads")
    p.add_argument("--save", default="", help="(a worker) a run directory to checkpoint the model into")
    p.add_argument("--out", default="")
    p.add_argument("--smoke", action="store_true")
    return p.parse_args(argv)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _model(width: int, depth: int):  # noqa: ANN202 (torch is imported by the worker only)
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.fc = nn.Linear(width, width)

        def forward(self, x):  # noqa: ANN001, ANN202
            return x + self.fc(self.norm(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(depth))

        def forward(self, x):  # noqa: ANN001, ANN202
            for layer in self.layers:
                x = layer(x)
            return x

    return Net()


def run_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed.fsdp  # noqa: F401 (imported before the measurement)
    import torch.distributed.tensor  # noqa: F401

    import distrib
    from distrib.runtime.collectives import all_gather_object

    torch.set_num_threads(1)
    strategy = args.runner.split("-")[1]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = distrib.Config().replace(**{"run.dir": args.save or tmp, "run.device": "cpu", "wandb.mode": "disabled", "dist.strategy": strategy})
        with distrib.Session(cfg) as session:
            session.setup(_model(8, 2))  # FSDP's (and DDP's) one-time cost, paid before measuring
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before, anon_before, start = _rss("VmRSS"), _rss("RssAnon"), time.perf_counter()
            with torch.device("meta" if args.runner.startswith(("meta", "load")) else "cpu"):
                model = _model(args.width, args.depth)
            whole = sum(p.numel() * p.element_size() for p in model.parameters())
            model = session.setup(model)
            setup_s = time.perf_counter() - start
            read = 0
            if args.runner == "load-fsdp":
                read = session.load_weights(model, args.weights).bytes_read
            mine = {
                "peak": _rss("VmHWM") - before,
                "setup_s": setup_s,
                "total_s": time.perf_counter() - start,
                "bytes_read": read,
                # What the rank owns after setup (+ load), without the file pages a load has mapped (page cache, reclaimable).
                "anon": _rss("RssAnon") - anon_before,
            }
            if args.save:
                session.save({"model": model}, step=1)
                session.wait_for_save()
            ranks = all_gather_object(mine)
            if session.rank == 0:
                Path(args.out).write_text(json.dumps({"whole": whole, "ranks": ranks}))


def _launch(args: argparse.Namespace, path: str, world: int, out: Path, **extra: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(HERE / "large_models.py")]
    cmd += ["--runner", path, "--width", str(args.width), "--depth", str(args.depth), "--out", str(out)]
    for k, v in extra.items():
        cmd += [f"--{k}", v]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{path} at {world} ranks failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def _export(checkpoint_run: Path, out: Path) -> dict:
    """`distrib export --format safetensors` in its own process, under /usr/bin/time -v for its peak."""
    cmd = [sys.executable, "-m", "distrib.cli", "export", str(checkpoint_run), "--format", "safetensors", "--out", str(out)]
    probe = "import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024, r.returncode)"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *cmd], env={**os.environ, "PYTHONPATH": str(HERE.parent)}, capture_output=True, text=True, timeout=900)
    peak, code = done.stdout.strip().splitlines()[-1].split()
    if code != "0":
        raise SystemExit(f"export failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    baseline = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-c", "import distrib.cli.export, torch.distributed.checkpoint, safetensors"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    return {"peak": int(peak), "imports_peak": int(baseline.stdout.split()[0]), "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.runner:
        run_worker(args)
        return 0
    if args.smoke:
        args.width, args.depth, args.worlds = 64, 4, "1,2"
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # The weights load-fsdp reads, and the checkpoint export reads: a 2-rank FSDP run of the same model.
        ckpt_run = work / "ckpt"
        _launch(args, "meta-fsdp", 2, work / "save.json", save=str(ckpt_run))
        from distrib.cli.export import main as export

        weights = work / "weights"
        if export([str(ckpt_run), "--format", "safetensors", "--out", str(weights), "--max-shard-size", "100MB"]) != 0:
            raise SystemExit("export of the checkpoint failed")
        file_bytes = sum(p.stat().st_size for p in weights.glob("*.safetensors"))
        for world in worlds:
            for path in PATHS:
                if world == 1 and path == "eager-fsdp":
                    continue  # one process shards nothing: the same as eager-ddp
                r = _launch(args, path, world, work / f"{path}-{world}.json", weights=str(weights))
                top = max(r["ranks"], key=lambda m: m["peak"])
                rows.append(
                    {
                        "path": path,
                        "world": world,
                        "model_mb": r["whole"] / 2**20,
                        "peak_mb": top["peak"] / 2**20,
                        "peak_x": top["peak"] / r["whole"],
                        "anon_x": max(m["anon"] for m in r["ranks"]) / r["whole"],
                        "setup_s": max(m["setup_s"] for m in r["ranks"]),
                        "total_s": max(m["total_s"] for m in r["ranks"]),
                        "read_x": max(m["bytes_read"] for m in r["ranks"]) / file_bytes if path == "load-fsdp" else None,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        exp = _export(ckpt_run, work / "exported")
        largest = args.width * args.width * 4
        exported = {
            "model_mb": rows[0]["model_mb"],
            "largest_tensor_mb": largest / 2**20,
            "peak_mb": exp["peak"] / 2**20,
            "imports_mb": exp["imports_peak"] / 2**20,
            "seconds": exp["seconds"],
        }
        print(json.dumps({"export": exported}), flush=True)
    if args.smoke:
        return 0
    stamp = datetime.date.today().isoformat()
    meta = {"date": stamp, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version()}
    import torch

    meta["torch"] = torch.__version__
    out = HERE / "results" / f"large-models-{stamp}"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "export": exported, "width": args.width, "depth": args.depth}, indent=2))
    lines = [
        f"Model: {args.depth} blocks of LayerNorm + Linear({args.width}, {args.width}), {rows[0]['model_mb']:.0f} MB fp32. Peak: the largest rank's resident "
        "memory over build + setup (+ load), above what it held before (VmHWM: it counts the file pages a load maps, which are page cache). "
        "Owned after: its anonymous memory after setup (+ load), above what it held before (RssAnon: without mapped files).",
        "",
        "| path | ranks | peak MB | peak / model | owned after / model | setup s | setup + load s | bytes read / files |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        read = f"{r['read_x']:.2f}" if r["read_x"] is not None else ""
        lines.append(
            f"| {r['path']} | {r['world']} | {r['peak_mb']:.0f} | {r['peak_x']:.2f} | {r['anon_x']:.2f} | {r['setup_s']:.2f} | {r['total_s']:.2f} | {read} |"
        )
    lines += [
        "",
        f"Export (`--format safetensors`, one process, from the 2-rank FSDP checkpoint): peak {exported['peak_mb']:.0f} MB, of which "
        f"{exported['imports_mb']:.0f} MB is the interpreter and imports alone; model {exported['model_mb']:.0f} MB, largest tensor "
        f"{exported['largest_tensor_mb']:.0f} MB; {exported['seconds']:.1f} s.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(rows, out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p in PATHS:
        pts = sorted((r["world"], r["peak_x"]) for r in rows if r["path"] == p)
        if pts:
            ax.plot([w for w, _ in pts], [x for _, x in pts], marker="o", label=p)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("ranks")
    ax.set_ylabel("peak host memory per rank / model size")
    ax.set_xticks(sorted({r["world"] for r in rows}))
    ax.set_title("Building and loading a model: per-rank peak host memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
