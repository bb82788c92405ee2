"""GPU proof in one command (#30): everything a GPU must confirm, within a budget, into one results file.

    scripts/gpu-check.sh                       # on a CUDA machine: every part, within 8 minutes
    scripts/gpu-check.sh --budget-s 300        # a shorter budget: parts that do not fit are listed as skipped
    python bench/gpu.py --device cpu --smoke   # CI: the very same code on the CPU, at tiny sizes

On a machine without CUDA the plain command says so and exits 0 at once. The parts, in order of value:

1. `pytest -m gpu`: the CUDA tests (the README launcher on the GPU, bit-exact resume on CUDA, bf16/fp16/
   compile, the profiler's CUDA trace and memory snapshots), and the no-host-sync check on every step
   path (`bench/sync_paths.py`: token-weighted loss, bf16, async checkpoints, the non-finite guard) with
   its self-test;
2. the language-model benchmark (`bench/lm.py`): examples/gpt.py's model at GPT-2 small's shape, `fit`
   against a nanoGPT-style hand loop, bf16 and torch.compile on both, interleaved rounds: tokens/s
   ratio (goal >= 0.99), MFU from the declared FLOPs per token and the device's peak, data-wait fraction;
3. feed efficiency and pinned/non_blocking transfers (`bench/gpu_feed.py`);
4. with 2 or more GPUs: the exactness tests on NCCL (world-size invariance, accumulation, eval count,
   resume after SIGKILL bit-exact), FSDP's sync check, DDP and FSDP tokens/s and peak memory at 1 and
   N GPUs (scaling), and the deepest GPT that trains under each.

Writes bench/results/gpu-<date>-<device>.json and .md (or --results) and prints the summary table; a
full run (not --smoke) also redraws BENCHMARKS.md's GPU section from every such file (`--render` does
only that): a table per device and date, and bench/results/gpu-check.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Dense bf16 peak FLOP/s of one device (the vendors' data sheets), for MFU; matched on the device's name.
PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("4090", 165e12),
]


def peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(), "host": platform.node()}
    if device == "cuda":
        info.update(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count())
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    else:
        info.update(name=f"cpu ({os.cpu_count()} cores)", count=0, memory_gib=None, driver=None)
    info["peak_bf16_flops"] = peak_flops(info["name"])
    return info


class Budget:
    """The wall-clock budget. A step gets its weight's share of what is left against the weights of the steps still
    to come (`ahead`, set as parts start), so the last part that runs has all that is left; none starts without 20 s."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.ahead = 0.0

    def left(self) -> float:
        return self.end - time.monotonic()

    def share(self, weight: float) -> float:
        return max(1.0, self.left() * weight / (weight + self.ahead))


def run(cmd: list[str], timeout: float, **env: str) -> tuple[int | None, str, str, float]:
    """(exit status or None on a timeout, stdout's tail, stderr's tail, seconds). On a timeout the command's whole
    process tree is ended (its own session): a torchrun or a benchmark's child left on the GPU would skew what follows."""
    started = time.monotonic()
    # wandb off: the check measures distrib, and a GPU image may have no wandb (a disabled wandb needs none).
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **env}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            code = None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        return code, out.read()[-8000:], err.read()[-4000:], time.monotonic() - started


def part_pytest(args: argparse.Namespace, budget: Budget, info: dict[str, Any]) -> dict[str, Any]:
    if args.device != "cuda":
        # The sync check's own run, on the CPU (no check there: the sync debug mode is CUDA's): the code a GPU runs.
        code, out, err, secs = run([sys.executable, "bench/sync_paths.py", "--device", "cpu", "--tiny", "--steps", "12"], budget.left() * 0.3)
        ran = _last_json(out) or {"error": (out + err)[-800:]}
        return {"status": "skipped", "reason": "pytest -m gpu and the sync check need a CUDA device", "sync_paths_on_cpu": ran, "sync_paths_status": code}
    out: dict[str, Any] = {}
    # A cold machine's first torch import and CUDA start are slow: each run may take 90 s (they take far less).
    code, stdout, stderr, secs = run([sys.executable, "bench/sync_paths.py"], max(90.0, budget.share(0.5)))
    out["sync_check"] = _last_json(stdout) or {"error": (stdout + stderr)[-800:]}
    code_s, stdout_s, stderr_s, _ = run([sys.executable, "bench/sync_paths.py", "--selftest"], max(90.0, budget.share(0.5)))
    selftest = _last_json(stdout_s) or {}
    out["sync_selftest"] = selftest or {"error": (stdout_s + stderr_s)[-800:]}
    # Caught, and at the planted line: a sync of distrib's own would fail the clean run, not pass this one.
    out["sync_selftest_caught"] = code_s == 1 and "synchroniz" in str(selftest.get("error", "")).lower() and "# planted" in str(selftest.get("where"))
    # (The feed benchmark's own CUDA test is the feed part below; the sync check's test is the two runs above.)
    # The files that hold gpu tests (not all of tests/: a module another image cannot import must not stop the
    # collection), verbose, so a run cut short by the budget still shows which tests passed.
    files = ["tests/e2e/test_gpu.py", "tests/e2e/parallel/test_wrap.py", "tests/unit/data/test_transfer.py"]
    pytest = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "--continue-on-collection-errors", "-k", "not no_host_sync", *files]
    code, stdout, stderr, secs = run(pytest, budget.share(5))
    counts = {k: len(re.findall(rf" {k.upper()}( |$)", stdout, flags=re.M)) for k in ("passed", "failed", "skipped", "error")}
    out.update(pytest_status=code, pytest_counts=counts, pytest_seconds=round(secs, 1), pytest_tail=(stdout + stderr)[-1500:] if code else stdout[-300:])
    ok = code == 0 and out["sync_check"].get("clean") is True and out["sync_selftest_caught"]
    return {"status": "ok" if ok else ("timeout" if code is None else "failed"), **out}


def part_lm(args: argparse.Namespace, budget: Budget, info: dict[str, Any]) -> dict[str, Any]:
    size, rounds, steps = ("tiny", 1, 6) if args.smoke else ("gpu", 2, 60)
    with tempfile.NamedTemporaryFile(suffix=".json") as res:
        # One GPU; on the CPU, 2 gloo ranks, so the smoke also runs the hand loop's DDP and distrib's.
        procs = "1" if args.device == "cuda" else "2"
        cmd = [sys.executable, "bench/lm.py", "--device", args.device, "--nproc", procs, "--size", size, "--precision", "bf16", "--compile"]
        cmd += ["--rounds", str(rounds), "--warmup", "3" if args.smoke else "15", "--steps", str(steps), "--log_every", "3" if args.smoke else "20"]
        cmd += ["--batch", "4" if args.smoke else "16", "--out", res.name]
        if info["peak_bf16_flops"]:
            cmd += ["--peak_flops", str(info["peak_bf16_flops"])]
        code, stdout, stderr, secs = run(cmd, budget.share(3))
        result = json.loads(Path(res.name).read_text() or "null") if code == 0 else None
    if result is None:
        return {"status": "timeout" if code is None else "failed", "tail": (stdout + stderr)[-2000:]}
    fields = ("tokens_per_s", "tokens_per_s_ratio", "mfu", "data_wait_frac", "peak_mem_bytes", "flops_per_token", "gpt", "batch_per_process", "steps")
    return {"status": "ok", "seconds": round(secs, 1), "goal_tokens_per_s_ratio": 0.99, **{k: result[k] for k in fields}}


def part_feed(args: argparse.Namespace, budget: Budget, info: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "bench/gpu_feed.py", "--device", args.device, "--results", tmp, "--name", "feed"]
        code, stdout, stderr, secs = run(cmd + (["--smoke"] if args.smoke else ["--rounds", "1"]), budget.share(1.5))
        path = Path(tmp, "feed.json")
        result = json.loads(path.read_text()) if path.exists() else None
    if result is None:
        return {"status": "timeout" if code is None else "failed", "tail": (stdout + stderr)[-2000:]}
    return {"status": "ok" if code == 0 else "failed", "seconds": round(secs, 1), "feed_efficiency": result["feed_efficiency"], "h2d": result["meta"]["h2d"]}


def part_multi(args: argparse.Namespace, budget: Budget, info: dict[str, Any]) -> dict[str, Any]:
    n = info["count"]
    if n < 2:
        return {"status": "skipped", "reason": f"{n} GPU(s): NCCL exactness, FSDP's sync check and scaling need 2 or more"}
    out: dict[str, Any] = {"gpus": n}
    # The CPU suite's exactness tests, on NCCL: at 2+ GPUs their ranks take a GPU each (run.device auto).
    picks = "invariance or accumulat or eval_count or every_sample or sigkill or killed"
    code, stdout, stderr, secs = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", picks, "tests/e2e"], budget.share(1.5))
    out["nccl_exactness"] = {"status": code, "last_line": stdout.strip().splitlines()[-1] if stdout.strip() else stderr[-300:], "seconds": round(secs, 1)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    with tempfile.TemporaryDirectory() as shared:
        code, stdout, stderr, _ = run([*torchrun, "bench/sync_paths.py", "--strategy", "fsdp"], max(90.0, budget.share(0.5)), SYNC_RUN_DIR=shared)
    out["fsdp_sync_check"] = _last_json(stdout) or {"error": (stdout + stderr)[-800:]}
    scaling: dict[str, Any] = {}
    for strategy in ("ddp", "fsdp"):
        for procs in (1, n):
            with tempfile.NamedTemporaryFile(suffix=".json") as res:
                cmd = [sys.executable, "bench/lm.py", "--device", "cuda", "--nproc", str(procs), "--size", "gpu", "--precision", "bf16", "--compile"]
                cmd += ["--rounds", "1", "--warmup", "10", "--steps", "30", "--log_every", "20", "--batch", "16", f"--distrib_set=dist.strategy={strategy}"]
                cmd += ["--loops", "distrib", "--out", res.name] + (["--peak_flops", str(info["peak_bf16_flops"])] if info["peak_bf16_flops"] else [])
                code, stdout, stderr, _ = run(cmd, budget.share(0.5))
                r = json.loads(Path(res.name).read_text() or "null") if code == 0 else None
            scaling[f"{strategy}@{procs}"] = (
                {k: r[k]["distrib"] for k in ("tokens_per_s", "mfu", "peak_mem_bytes")} if r else {"error": (stdout + stderr)[-600:]}
            )
    for strategy in ("ddp", "fsdp"):
        one, many = scaling.get(f"{strategy}@1", {}), scaling.get(f"{strategy}@{n}", {})
        if "tokens_per_s" in one and "tokens_per_s" in many:
            scaling[f"{strategy}_scaling_efficiency"] = many["tokens_per_s"] / (n * one["tokens_per_s"])
    out["scaling"] = scaling
    out["largest_gpt"] = {strategy: _largest(n, budget, strategy) for strategy in ("fsdp", "ddp")}
    ok = out["nccl_exactness"]["status"] == 0 and out["fsdp_sync_check"].get("clean") is True
    return {"status": "ok" if ok else "failed", **out}


def _largest(n: int, budget: Budget, strategy: str) -> dict[str, Any]:
    """The deepest GPT (GPT-2 small's width, doubling its layers) that trains a few steps with `strategy` on n GPUs."""
    fits, layers = 0, 12
    while budget.left() > 60 and layers <= 768:
        overrides = json.dumps({"context": 1024, "layers": layers, "dim": 768, "heads": 12})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "bench/lm.py", "--runner", "distrib"]
        cmd += ["--device", "cuda", "--size", "gpu", "--precision", "bf16", "--warmup", "2", "--steps", "3", "--log_every", "5", "--batch", "8"]
        cmd += [f"--distrib_set=dist.strategy={strategy}", "--distrib_set=train.activation_checkpointing=full"]
        code, _, _, _ = run(cmd, min(budget.left() - 30, 180), BENCH_GPT=overrides, BENCH_RESULT=os.devnull)
        if code != 0:
            break
        fits, layers = layers, layers * 2
    return {"layers": fits, "dim": 768, "context": 1024, "note": "doubling from 12 layers until a run fails (out of memory) or the budget ends"}


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


PARTS = (("pytest_gpu", part_pytest), ("lm", part_lm), ("feed", part_feed), ("multi_gpu", part_multi))
WEIGHTS = {"pytest_gpu": 6.0, "lm": 3.0, "feed": 1.5, "multi_gpu": 6.0}
"""Each part's weight in the budget (its steps' `share` weights add up to it); multi_gpu's only with 2+ GPUs."""


def summary(result: dict[str, Any]) -> str:
    info, parts = result["device"], result["parts"]
    lines = [
        f"# GPU check, {result['date']}: {info['name']}",
        "",
        "| | |",
        "|---|---|",
        f"| device | {info['name']} x {info['count']} ({info['memory_gib']} GiB) |",
        f"| driver / CUDA / torch | {info['driver']} / {info['cuda']} / {info['torch']} |",
        f"| budget | {result['budget_s']:.0f} s, used {result['seconds']:.0f} s |",
    ]
    for name, part in parts.items():
        lines.append(f"| {name} | {part['status']}{': ' + part['reason'] if 'reason' in part else ''} |")
    lm = parts.get("lm", {})
    if lm.get("status") == "ok":
        t, mfu, wait = lm["tokens_per_s"], lm["mfu"], lm["data_wait_frac"]
        lines.append(f"| LM tokens/s, fit / hand | {lm['tokens_per_s_ratio']:.3f} (goal >= 0.99): {t['distrib']:,.0f} / {t['hand']:,.0f} |")
        lines.append(f"| LM MFU, fit / hand | {_pct(mfu['distrib'])} / {_pct(mfu['hand'])} |")
        lines.append(f"| LM data wait, fit / hand | {wait['distrib']:.1%} / {wait['hand']:.1%} |")
    feed = parts.get("feed", {})
    if feed.get("status") == "ok":
        lines.append(f"| feed efficiency (distrib / resident) | {feed['feed_efficiency'].get('distrib', float('nan')):.3f} |")
    multi = parts.get("multi_gpu", {})
    if "scaling" in multi:
        sc = multi["scaling"]
        for strategy in ("ddp", "fsdp"):
            eff = sc.get(f"{strategy}_scaling_efficiency")
            many = sc.get(f"{strategy}@{multi['gpus']}", {})
            lines.append(
                f"| {strategy} at {multi['gpus']} GPUs | scaling {eff if eff is None else round(eff, 3)}, peak {many.get('peak_mem_bytes')} B on rank 0 |"
            )
        lines.append(f"| NCCL exactness tests | {multi['nccl_exactness']['last_line']} |")
        deepest = ", ".join(f"{k}: {v['layers']} layers" for k, v in multi["largest_gpt"].items())
        lines.append(f"| deepest GPT (768 wide, 1024 context) | {deepest} |")
    py = parts.get("pytest_gpu", {})
    if "pytest_counts" in py:
        lines.append(
            f"| pytest -m gpu | {py['pytest_counts']}; sync check clean: {py['sync_check'].get('clean')}, self-test caught: {py['sync_selftest_caught']} |"
        )
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


BEGIN, END = "<!-- gpu-check:begin (bench/gpu.py --render writes this section) -->", "<!-- gpu-check:end -->"


def render(results_dir: Path, benchmarks: Path) -> str:
    """BENCHMARKS.md's GPU section from every full (not smoke) results file: which numbers are from which device and date."""
    runs = [json.loads(p.read_text()) for p in sorted(results_dir.glob("gpu-*-*.json")) if p.stem.count("-") >= 4]
    runs = [r for r in runs if isinstance(r, dict) and "parts" in r and not r.get("smoke") and r["device"].get("count")]
    if not runs:
        body = "No GPU check has run yet: no session since #30 was lent a GPU. `scripts/gpu-check.sh` fills this section.\n"
    else:
        body = "\n".join(summary(r).replace("# GPU check", "### GPU check") for r in runs)
        try:
            _plot(runs, results_dir / "gpu-check.png")
            body += "\n![GPU check](bench/results/gpu-check.png)\n"
        except ImportError:  # an image without matplotlib: the tables alone
            pass
    text = benchmarks.read_text()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\n" + body + END + rest.split(END, 1)[1]
        benchmarks.write_text(text)
    return body


def _plot(runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    labels, ratios, mfus = [], [], []
    for r in runs:
        lm = r["parts"].get("lm", {})
        if lm.get("status") != "ok":
            continue
        labels.append(f"{r['device']['name']}\n{r['date']}")
        ratios.append(lm["tokens_per_s_ratio"])
        mfus.append(lm["mfu"]["distrib"] or 0.0)
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], ratios, width=0.4, label="fit / hand tokens/s")
    ax.bar([i + 0.2 for i in x], mfus, width=0.4, label="fit MFU")
    ax.axhline(0.99, color="tab:red", ls="--", lw=1, label="goal 0.99")
    ax.set_xticks(list(x), labels)
    ax.set_title("GPU check: the language-model benchmark (bf16, torch.compile)")
    ax.legend(loc="lower right")
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round: what CI runs on the CPU")
    p.add_argument("--budget-s", dest="budget_s", type=float, default=480.0, help="wall-clock budget for all parts (default 8 minutes)")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--render", action="store_true", help="only redraw BENCHMARKS.md's GPU section from the results files")
    args = p.parse_args(argv)
    if args.render:
        print(render(Path(args.results), REPO / "BENCHMARKS.md"))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here: nothing to check (the CPU path: python bench/gpu.py --device cpu --smoke)")
        return 0
    started, budget = time.monotonic(), Budget(args.budget_s)
    info = device_info(args.device)
    print(
        f"gpu-check: {info['name']} x {info['count']}, driver {info['driver']}, CUDA {info['cuda']}, torch {info['torch']}; budget {args.budget_s:.0f} s",
        flush=True,
    )
    parts: dict[str, Any] = {}
    runnable = [name for name, _ in PARTS if name != "multi_gpu" or info["count"] >= 2]
    for name, fn in PARTS:
        budget.ahead = sum(WEIGHTS[n] for n in runnable[runnable.index(name) + 1 :]) if name in runnable else 0.0
        if budget.left() < 20:
            parts[name] = {"status": "skipped", "reason": "the budget ran out"}
            continue
        print(f"gpu-check: {name} ({budget.left():.0f} s left)", flush=True)
        parts[name] = fn(args, budget, info)
        print(f"gpu-check: {name}: {parts[name]['status']}", flush=True)
    date = datetime.date.today().isoformat()
    result = {"date": date, "smoke": args.smoke, "budget_s": args.budget_s, "seconds": time.monotonic() - started, "device": info, "parts": parts}
    slug = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
    stem = Path(args.results) / f"gpu-{date}-{slug}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = summary(result)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"gpu-check: wrote {stem}.json and .md")
    if not args.smoke:
        render(Path(args.results), REPO / "BENCHMARKS.md")
    return 0 if all(part["status"] in ("ok", "skipped") for part in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
