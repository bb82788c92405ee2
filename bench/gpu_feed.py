"""GPU feed efficiency and the no-host-sync check (issue #6, item 4), on one device.

    python bench/gpu_feed.py                         # cuda: 3 alternating rounds + the sync check
    python bench/gpu_feed.py --smoke                 # a few steps of everything (tests/e2e/test_bench.py)
    python bench/gpu_feed.py --smoke --device cpu    # the same code paths without CUDA (CI)

An input-heavy workload: uint8 images (3x224x224, 150 KB a sample) through a DataLoader with
workers, normalised on the device by a small convnet, so the host-to-device copy is a large part of
a step. Variants, each in its own process, alternating:

- `resident`: one batch already on the device, stepped over and over (the ceiling);
- `distrib`: `distrib.fit` with the real DataLoader, pinned memory, `non_blocking` and the prefetcher;
- `distrib_no_prefetch`: the same with `data.prefetch=false` (the copy on the compute stream);
- `naive`: a hand loop with pageable memory and a blocking `.to(device)`;
- `loader`: the pinned DataLoader alone, no GPU work: if it is slower than `resident`, the workload
  measures the host's loader, not the feed, and the efficiencies mean nothing (change `--set`).

Feed efficiency = a variant's steps/s over `resident`'s (the step-time ratio the other way round);
the goal for `distrib` is >= 0.97. `distrib` logs at its default interval (train.log_every=50),
whose metric all-reduce is the one place a host sync is allowed. The sync check runs `distrib.fit` with
`torch.cuda.set_sync_debug_mode("error")` on every step but the logging ones, so any host sync in
the hot path raises; a self-test puts a `.item()` in the loss and must be caught.
Writes <results>/gpu-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

HERE = Path(__file__).resolve().parent
VARIANTS = ("resident", "distrib", "distrib_no_prefetch", "naive", "loader")
FULL = {"image": 224, "batch": 256, "width": 64, "blocks": 12, "workers": 8, "warmup": 20, "steps": 200, "pool": 1024}
SMOKE = {"image": 32, "batch": 16, "width": 8, "blocks": 1, "workers": 1, "warmup": 2, "steps": 6, "pool": 64}


class Images(Dataset):
    """uint8 images from a fixed pool (generating every sample would dominate); labels per index."""

    def __init__(self, n: int, size: int, pool: int, classes: int = 1000, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randint(0, 256, (pool, 3, size, size), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[i % len(self.pool)], self.labels[i]


class ConvNet(nn.Module):
    """A stride-4 stem and 3x3 blocks; uint8 in, normalised on the device (as a real pipeline would)."""

    def __init__(self, width: int, blocks: int, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=4), nn.ReLU()]
        for _ in range(blocks):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float().div_(255.0))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wraps `optimizer.step`: device-synchronised timestamps at the end of warm-up and at the last step only."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, warmup: int, total: int) -> None:
        self.count, self.t0, self.t1 = 0, 0.0, 0.0
        self.device, self.warmup, self.total = device, warmup, total
        inner = optimizer.step

        def step(*a: Any, **k: Any) -> Any:
            out = inner(*a, **k)
            self.tick()
            return out

        optimizer.step = step  # type: ignore[method-assign]

    def tick(self) -> None:
        """One step done; timestamps the end of warm-up and the last step."""
        self.count += 1
        if self.count in (self.warmup, self.total):
            _sync(self.device)  # two syncs in a run: the steps in between are timed as they run
            if self.count == self.warmup:
                self.t0 = time.perf_counter()
            else:
                self.t1 = time.perf_counter()

    def steps_per_s(self, steps: int) -> float:
        return steps / (self.t1 - self.t0)


def guard_syncs(model: nn.Module, optimizer: torch.optim.Optimizer, *, start: int, log_every: int, total: int) -> None:
    """Turn sync debug mode to "error" for every step after `start` but the logging ones and the end.

    On at each forward (a pre-hook); off right after an optimizer step that is followed by logging.
    The first `start` steps are left out: lazy initialisation (cuDNN, cuBLAS handles) is not the hot path.
    """
    inner, count = optimizer.step, [0]

    def on(_module: nn.Module, _args: Any) -> None:
        if count[0] >= start:
            torch.cuda.set_sync_debug_mode("error")

    model.register_forward_pre_hook(on)

    def step(*a: Any, **k: Any) -> Any:
        out = inner(*a, **k)
        count[0] += 1
        if count[0] % log_every == 0 or count[0] >= total:
            torch.cuda.set_sync_debug_mode("default")
        return out

    optimizer.step = step  # type: ignore[method-assign]


def build(p: dict, device: torch.device) -> tuple[Images, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    data = Images((p["warmup"] + p["steps"] + 2) * p["batch"], p["image"], p["pool"])
    model = ConvNet(p["width"], p["blocks"]).to(device)
    return data, model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def run_variant(variant: str, p: dict, device: torch.device) -> dict:
    """One variant in this process; returns its record."""
    data, model, opt = build(p, device)
    total = p["warmup"] + p["steps"]
    checking = variant.startswith("synccheck")
    clock = None if checking else Clock(opt, device, p["warmup"], total)  # its two syncs would trip the check
    if variant == "resident":
        x, y = (t.to(device) for t in next(iter(DataLoader(data, batch_size=p["batch"]))))
        for _ in range(total):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif variant == "loader":
        loader = DataLoader(data, batch_size=p["batch"], shuffle=True, num_workers=p["workers"], pin_memory=device.type == "cuda")
        for i, _batch in enumerate(loader):
            clock.tick()  # a batch is this variant's step (no optimizer); nothing is queued on the GPU to sync
            if i + 1 == total:
                break
    elif variant == "naive":
        loader = DataLoader(data, batch_size=p["batch"], shuffle=True, num_workers=p["workers"], pin_memory=False)
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)  # pageable memory, blocking copy
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i + 1 == total:
                break
    elif variant in ("distrib", "distrib_no_prefetch", "synccheck", "synccheck_selftest"):
        fit_distrib(variant, p, device, data, model, opt, total)
    else:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}, synccheck, synccheck_selftest")
    return {"variant": variant, "steps_per_s": clock.steps_per_s(p["steps"]) if clock else None}


def fit_distrib(variant: str, p: dict, device: torch.device, data: Images, model: nn.Module, opt: torch.optim.Optimizer, total: int) -> None:
    import distrib
    from distrib.config import TrainConfig

    log_every = 10 if variant.startswith("synccheck") else TrainConfig().log_every  # several boundaries to check; the default when timed
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    if variant.startswith("synccheck"):
        guard_syncs(model, opt, start=2, log_every=log_every, total=total)
    if variant == "synccheck_selftest":

        def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: F811 - a host sync on purpose
            loss = F.cross_entropy(out, y)
            loss.item()
            return loss

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = distrib.Config().replace(
            **{
                "run.dir": run_dir,
                "run.device": str(device),
                "data.num_workers": p["workers"],
                "data.prefetch": variant != "distrib_no_prefetch",
                "train.batch_size": p["batch"],
                "train.epochs": 1,
                "train.max_steps": total,
                "train.log_every": log_every,
                "ckpt.every": None,
                "ckpt.resume": "never",
                "wandb.mode": "disabled",
                "train.progress": "lines",
            }
        )
        distrib.fit(cfg, model=model, optimizer=opt, train_data=data, loss_fn=loss_fn)


def child(variant: str, p: dict, device: str) -> dict:
    """Run one variant in a fresh process (its own CUDA context, allocator and loader workers)."""
    cmd = [sys.executable, str(Path(__file__)), "--variant", variant, "--device", device, "--params", json.dumps(p)]
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"variant": variant, "error": (done.stdout + done.stderr)[-4000:], "returncode": done.returncode}
    return json.loads(lines[-1])


def sync_check(p: dict, device: str) -> dict:
    """The hot path under sync debug mode "error", and the self-test that shows the check can fail."""
    if device != "cuda":
        return {"skipped": "torch.cuda.set_sync_debug_mode needs a CUDA device"}
    clean, planted = child("synccheck", p, device), child("synccheck_selftest", p, device)
    caught = "error" in planted and "synchroniz" in planted["error"]
    return {"clean_steps_ok": "error" not in clean, "clean": clean, "selftest_caught": caught, "selftest_tail": planted.get("error", "")[-600:]}


def copy_bandwidth(p: dict, device: str) -> dict:
    """Host-to-device GB/s for one batch of images, pinned (non_blocking) and pageable: the feed's raw numbers."""
    if device != "cuda":
        return {}
    batch = torch.randint(0, 256, (p["batch"], 3, p["image"], p["image"]), dtype=torch.uint8)
    out = {}
    for name, src in (("pinned", batch.pin_memory()), ("pageable", batch)):
        for _ in range(3):
            src.to(device, non_blocking=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            src.to(device, non_blocking=True)
        torch.cuda.synchronize()
        out[f"{name}_gb_per_s"] = round(20 * batch.numel() / (time.perf_counter() - t) / 1e9, 2)
    return out


def report(results: dict, sync: dict, meta: dict) -> str:
    base = statistics.median(results["resident"])
    rows = [
        f"Device: {meta['device']}; torch {meta['torch']}; {meta['rounds']} rounds; params {json.dumps(meta['params'])}",
        f"Host-to-device copy of one batch: {json.dumps(meta['h2d']) if meta['h2d'] else 'not measured (no CUDA)'}",
        "",
        "| variant | steps/s (median) | spread | feed efficiency (vs resident) |",
        "|---|---|---|---|",
    ]
    for v, sps in results.items():
        med = statistics.median(sps)
        label = "loader alone (no GPU work; headroom)" if v == "loader" else v
        rows.append(f"| {label} | {med:.2f} | {(max(sps) - min(sps)) / med:.1%} | {med / base:.3f} |")
    if "skipped" in sync:
        rows += ["", f"Sync check: skipped ({sync['skipped']})."]
    else:
        rows += [
            "",
            f"Sync check (set_sync_debug_mode('error') on non-logging steps): clean run {'passed' if sync['clean_steps_ok'] else 'FAILED'}; "
            f"self-test with a planted .item() {'caught' if sync['selftest_caught'] else 'NOT caught'}.",
        ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--name", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=INT", help=f"override a workload parameter: {', '.join(FULL)}")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.variant:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        print(json.dumps(run_variant(ns.variant, json.loads(ns.params), torch.device(ns.device))), flush=True)
        return 0
    if ns.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu to run the same code paths on the CPU", file=sys.stderr)
        return 2
    p, rounds = (dict(SMOKE), 1) if ns.smoke else (dict(FULL), ns.rounds)
    for item in ns.set:
        key, _, value = item.partition("=")
        if key not in p or not value.isdigit():
            ap.error(f"--set {item!r}: expected KEY=INT with KEY one of {', '.join(p)}")
        p[key] = int(value)
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in VARIANTS:  # alternate, so drift hits every variant alike
            rec = child(v, p, ns.device)
            if "error" in rec:
                print(f"{v} failed ({rec['returncode']}):\n{rec['error']}", file=sys.stderr)
                return 1
            results[v].append(rec["steps_per_s"])
            print(f"round {r + 1}/{rounds} {v:20s} {rec['steps_per_s']:8.2f} steps/s", flush=True)
    sync = sync_check(p, ns.device)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "rounds": rounds,
        "params": p,
        "device": torch.cuda.get_device_name() if ns.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "host_cpus": os.cpu_count(),
        "h2d": copy_bandwidth(p, ns.device),
    }
    name = ns.name or ("gpu-smoke" if ns.smoke else f"gpu-{datetime.date.today().isoformat()}")
    ns.results.mkdir(parents=True, exist_ok=True)
    eff = {v: statistics.median(s) / statistics.median(results["resident"]) for v, s in results.items()}
    (ns.results / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results, "feed_efficiency": eff, "sync_check": sync}, indent=2) + "\n")
    md = report(results, sync, meta)
    (ns.results / f"{name}.md").write_text(md + "\n")
    print(md)
    ok = "skipped" in sync or (sync["clean_steps_ok"] and sync["selftest_caught"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
