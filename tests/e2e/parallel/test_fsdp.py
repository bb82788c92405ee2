"""FSDP2 (`dist.strategy=fsdp`) on real gloo ranks and real torchrun: the same numbers as DDP, one
reduction per optimizer step, sharded checkpoints that resume bit-exact or at another world size,
and the memory it saves, counted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from distrib import Session, Trainer
from distrib.checkpoint import store as ck
from distrib.checkpoint.sharded import SHARDED_DIR
from distrib.cli.task import TaskConfig, make_datasets, make_model
from distrib.parallel.wrap import state_bytes
from distrib.runtime.stop import EXIT_STOPPED
from tests.helpers import REPO, TaskData, child_env, read_metrics, read_summary, rewind, run_train, spawn, wait_for_checkpoints, wait_for_training

# SGD (its update is linear in the gradient, so float sums agree closely), clipping that bites (the
# global norm of sharded gradients), accumulation, a short tail step (4000 = 62.5 global batches of
# 64) and an eval set that does not split evenly (filler forwards on the rank with fewer batches).
ARGS = [
    "--optim.name",
    "sgd",
    "--optim.lr",
    "0.2",
    "--train.clip_grad_norm",
    "0.5",
    "--train.grad_accum",
    "2",
    "--train.epochs",
    "2",
    "--data.train_size",
    "4000",
    "--data.eval_size",
    "301",
    "--ckpt.every",
    "20",
    "--train.log_every",
    "8",
    "--wandb.mode",
    "disabled",
]
FSDP = ["--dist.strategy", "fsdp"]


def _params(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


def _assert_close(a, b) -> None:
    pa, pb, p0 = _params(a), _params(b), make_model(TaskConfig(), seed=0).state_dict()
    assert pa.keys() == pb.keys() == p0.keys()
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) <= 1e-5
    assert max((pa[k] - p0[k]).abs().max().item() for k in pa) > 1e-2  # training moved them far beyond the tolerance


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One launch each, shared by the tests below: DDP 2x16, FSDP 2x16, FSDP 1 process x 32."""
    root = tmp_path_factory.mktemp("fsdp")
    out = {"ddp": root / "ddp", "fsdp": root / "fsdp", "one": root / "one"}
    run_train([*ARGS, "--train.batch_size", "16", "--run.dir", str(out["ddp"])], nproc=2)
    run_train([*ARGS, *FSDP, "--train.batch_size", "16", "--run.dir", str(out["fsdp"])], nproc=2)
    run_train([*ARGS, *FSDP, "--train.batch_size", "32", "--run.dir", str(out["one"])], nproc=1)
    return out


def test_fsdp_ends_where_ddp_and_one_process_do(runs):
    _assert_close(runs["fsdp"], runs["ddp"])
    _assert_close(runs["fsdp"], runs["one"])
    ddp, fsdp, one = (read_summary(runs[k]) for k in ("ddp", "fsdp", "one"))
    assert fsdp["optimizer_steps"] == ddp["optimizer_steps"] == 2 * 63 and fsdp["samples_seen"] == 2 * 4000
    for s in (ddp, one):  # exact metrics: every eval sample counted once, the same loss
        assert fsdp["eval"]["count"] == s["eval"]["count"] == 301
        assert abs(fsdp["eval"]["loss"] - s["eval"]["loss"]) < 1e-5
    train = [r for r in read_metrics(runs["fsdp"]) if r["kind"] == "train"]
    assert [r["loss"] for r in train] == pytest.approx([r["loss"] for r in read_metrics(runs["ddp"]) if r["kind"] == "train"], abs=1e-5)


def test_fsdp_checkpoint_is_a_shard_per_rank_and_exports_to_model_pt(runs, tmp_path):
    newest = ck.candidates(runs["fsdp"] / "checkpoints")[0]
    files = {p.relative_to(newest).as_posix(): p.stat().st_size for p in newest.rglob("*") if p.is_file()}
    shards = sorted(f for f in files if f.endswith(".distcp"))
    assert shards == [f"{SHARDED_DIR}/__0_0.distcp", f"{SHARDED_DIR}/__1_0.distcp"]
    assert max(files.values()) < 0.6 * sum(files.values()), files  # no single file holds most of the state
    assert set(json.loads((newest / ck.MANIFEST).read_text())["files"]) == set(files) - {ck.MANIFEST}  # all verified
    # `distrib export` assembles the shards in one process; the run's last checkpoint is its model.pt.
    out = tmp_path / "exported.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "distrib.cli", "export", str(runs["fsdp"]), "--out", str(out)], capture_output=True, text=True, cwd=REPO, env=child_env()
    )
    assert proc.returncode == 0, proc.stderr
    exported, whole = torch.load(out, weights_only=True), _params(runs["fsdp"])
    assert exported.keys() == whole.keys() and all(torch.equal(exported[k], whole[k]) for k in whole)


def test_fsdp_composes_with_torch_compile(tmp_path, runs):
    compiled = tmp_path / "compiled"
    run_train([*ARGS, *FSDP, "--train.batch_size", "16", "--train.compile", "--run.dir", str(compiled)], nproc=2, timeout=400)
    _assert_close(compiled, runs["fsdp"])


def _launch(run, *torchrun_flags: str, extra: list[str] = ()) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *torchrun_flags,
        "-m",
        "distrib.train",
        *ARGS,
        *FSDP,
        "--train.batch_size",
        "16",
        *extra,
        "--run.dir",
        str(run),
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_fsdp_elastic_restart_after_a_worker_is_killed_is_bit_exact(tmp_path, runs):
    run = tmp_path / "elastic"
    proc = _launch(run, "--max-restarts=1")
    wait_for_checkpoints(run, 2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out, "the restarted workers did not resume"
    assert read_summary(run)["params_sha256"] == read_summary(runs["fsdp"])["params_sha256"]


def test_fsdp_stop_then_resume_bit_exact_at_two_ranks_and_resharded_on_one(tmp_path, runs):
    run = tmp_path / "stopped"
    proc = _launch(run, extra=["--ckpt.every", "100000", "--data.num_workers", "1"])
    wait_for_training(run, proc)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert f"Exit status {EXIT_STOPPED}" in out and not (run / "summary.json").exists(), out[-3000:]
    step = int(re.search(r"\[rank0\] stopped at step (\d+)/", out).group(1))
    assert json.loads((run / "stopped.json").read_text()) == {"step": step, "signal": "SIGTERM", "exit_status": EXIT_STOPPED}
    assert 0 < step < 126 and [p.name for p in ck.candidates(run / "checkpoints")] == [f"step-{step:09d}"]
    one = tmp_path / "on-one"
    shutil.copytree(run, one)
    # Same world size: bit-exact.
    run_train([*ARGS, *FSDP, "--train.batch_size", "16", "--run.dir", str(run)], nproc=2)
    assert read_summary(run)["params_sha256"] == read_summary(runs["fsdp"])["params_sha256"]
    # One process (no sharding: DCP reassembles the two shards): both epochs, every sample.
    res = run_train([*ARGS, *FSDP, "--train.batch_size", "32", "--run.dir", str(one)], nproc=1)
    assert f"resumed from {ck.step_dir(one / 'checkpoints', step)}" in res.stdout + res.stderr
    summary = read_summary(one)
    assert summary["epochs_completed"] == 2 and summary["samples_seen"] == 2 * 4000 and summary["eval"]["count"] == 301
    assert summary["world_size"] == 1
    assert summary["eval"]["accuracy"] > read_summary(runs["fsdp"])["eval"]["accuracy"] - 0.05  # it trained on


# ----------------------------------------------------------------------------- HSDP and CPU offload


@pytest.fixture(scope="module")
def hsdp_runs(tmp_path_factory) -> dict:
    """4 ranks, the same global batch of 32 as `runs`: HSDP 2 x 2 (with activation checkpointing) and DDP."""
    root = tmp_path_factory.mktemp("hsdp")
    out = {"hsdp": root / "hsdp", "ddp4": root / "ddp4"}
    hsdp = ["--dist.replicate", "2", "--train.activation_checkpointing", "full"]
    run_train([*ARGS, *FSDP, *hsdp, "--train.batch_size", "8", "--run.dir", str(out["hsdp"])], nproc=4)
    run_train([*ARGS, "--train.batch_size", "8", "--run.dir", str(out["ddp4"])], nproc=4)
    return out


def test_hsdp_2x2_ends_where_ddp_at_4_ranks_and_one_process_do(runs, hsdp_runs):
    hsdp, ddp4 = hsdp_runs["hsdp"], hsdp_runs["ddp4"]
    _assert_close(hsdp, ddp4)
    _assert_close(hsdp, runs["one"])
    s = read_summary(hsdp)
    assert s["world_size"] == 4 and s["optimizer_steps"] == 2 * 63 and s["samples_seen"] == 2 * 4000 and s["eval"]["count"] == 301
    assert abs(s["eval"]["loss"] - read_summary(runs["one"])["eval"]["loss"]) < 1e-5
    config = json.loads((hsdp / "config.json").read_text())
    assert config["dist"]["replicate"] == 2 and config["train"]["activation_checkpointing"] == "full"
    newest = ck.candidates(hsdp / "checkpoints")[0]
    assert sorted(p.name for p in (newest / SHARDED_DIR).glob("*.distcp"))  # sharded DCP, as under FSDP


def test_an_hsdp_checkpoint_resumes_on_two_ranks_under_fsdp_and_ends_the_same(hsdp_runs, tmp_path):
    run = tmp_path / "resharded"
    shutil.copytree(hsdp_runs["hsdp"], run)
    rewind(run, 100)
    proc = run_train([*ARGS, *FSDP, "--train.batch_size", "16", "--run.dir", str(run)], nproc=2)
    assert "resumed" in (proc.stdout + proc.stderr).lower()
    s = read_summary(run)
    assert s["world_size"] == 2 and s["epochs_completed"] == 2 and s["samples_seen"] == 2 * 4000 and s["eval"]["count"] == 301
    _assert_close(run, hsdp_runs["hsdp"])


def test_fsdp_cpu_offload_with_selective_checkpointing_ends_where_fsdp_does(runs, tmp_path):
    run = tmp_path / "offload"
    more = ["--dist.fsdp_offload", "true", "--train.activation_checkpointing", "selective"]
    run_train([*ARGS, *FSDP, *more, "--train.batch_size", "16", "--run.dir", str(run)], nproc=2)
    _assert_close(run, runs["fsdp"])
    config = json.loads((run / "config.json").read_text())
    assert config["dist"]["fsdp_offload"] is True and config["train"]["activation_checkpointing"] == "selective"


def test_checkpoints_move_between_layouts_ddp_to_fsdp_and_hsdp_to_ddp(runs, hsdp_runs, tmp_path):
    """A DDP checkpoint (saved whole) resumes under FSDP, each rank taking its shards of the model and of AdamW's
    state; an HSDP one (DCP shards) resumes under DDP at another world size. Each ends where its run did."""
    for source, dotted, nproc in ((runs["ddp"], FSDP, 2), (hsdp_runs["hsdp"], [], 2)):
        run = tmp_path / f"{source.name}-to-{'fsdp' if dotted else 'ddp'}"
        shutil.copytree(source, run)
        rewind(run, 100)
        run_train([*ARGS, *dotted, "--train.batch_size", "16", "--run.dir", str(run)], nproc=nproc)
        s = read_summary(run)
        assert s["epochs_completed"] == 2 and s["samples_seen"] == 2 * 4000 and s["eval"]["count"] == 301 and s["optimizer_steps"] == 126
        _assert_close(run, source)
        assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"][-1] == 126


# ----------------------------------------------------------------------------- in-process ranks


class Counting:
    """FSDP2's reduce-scatter, counted: the hook FSDP offers for a custom collective (cf. DDP's comm hook)."""

    def __init__(self) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

        self.inner, self.calls, self.numel = DefaultReduceScatter(), 0, 0
        self.after_calls, self.after_numel = 0, 0

    def allocate(self, *args, **kwargs):
        return self.inner.allocate(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.numel += kwargs["input_tensor"].numel() if "input_tensor" in kwargs else args[1].numel()
        return self.inner(*args, **kwargs)

    def after(self, reduced: torch.Tensor) -> None:
        """FSDP's all-reduce hook: after the all-reduce across replicas under HSDP (after the reduce-scatter without)."""
        self.after_calls += 1
        self.after_numel += reduced.numel()


def _fsdp_counts(rank: int, world: int, run_dir: str, accum: int, replicate: int = 1) -> dict:
    from torch.distributed.fsdp import FSDPModule

    cfg = TaskData().replace(
        **{
            "run.dir": run_dir,
            "run.device": "cpu",
            "task.hidden": 16,
            "task.depth": 1,
            "dist.strategy": "fsdp",
            "dist.replicate": replicate,
            "data.train_size": 200,
            "train.batch_size": 8,
            "train.grad_accum": accum,
            "train.epochs": 2,
            "train.log_every": 3,
            "wandb.mode": "disabled",
            "ckpt.every": None,
        }
    )
    train, _ = make_datasets(cfg.task, train_size=200, eval_size=8, seed=0)
    model = make_model(cfg.task, seed=0)
    with Session(cfg) as session:
        trainer = Trainer(session, model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01), train_data=train)
        trainer.prepare()
        units = [m for m in trainer.model.modules() if isinstance(m, FSDPModule) and any(True for _ in m.parameters(recurse=False))]
        counter = Counting()
        for m in units:
            m.set_custom_reduce_scatter(counter)
            m.set_all_reduce_hook(counter.after)
        summary = trainer.fit()
        calls = {"rs": counter.calls, "rs_numel": counter.numel, "after": counter.after_calls, "after_numel": counter.after_numel}
        # Memory: this rank's parameters, gradients and AdamW state after one more backward.
        x, y = train.tensors[0][:8], train.tensors[1][:8]
        torch.nn.functional.cross_entropy(trainer.model(x), y).backward()
        held = state_bytes(trainer.model, trainer.optimizer)
    return {"calls": calls, "units": len(units), "steps": summary["optimizer_steps"], "bytes": held}


@pytest.mark.parametrize("accum", [1, 4])
def test_fsdp_reduces_gradients_once_per_optimizer_step(tmp_path, accum):
    results = spawn(_fsdp_counts, 2, tmp_path, str(tmp_path / "run"), accum)
    steps = 2 * -(-13 // accum)  # 100 samples per rank, batch 8: 13 micro-batches an epoch
    for r in results:
        assert r["units"] == 2 and r["steps"] == steps  # the MLP's two Linear layers are the blocks
        assert r["calls"]["rs"] == steps * r["units"], f"{r['calls']} reduce-scatters for {steps} steps ({13 * 2} micro-batches)"


def test_hsdp_reduce_scatters_within_a_pair_and_all_reduces_across_pairs_once_per_optimizer_step(tmp_path):
    results = spawn(_fsdp_counts, 4, tmp_path, str(tmp_path / "run"), 4, 2)  # 4 ranks, 2 x 2, accumulating 4
    params = sum(p.numel() for p in make_model(TaskConfig(hidden=16, depth=1), seed=0).parameters())
    steps = 2 * -(-7 // 4)  # 50 samples per rank, batch 8: 7 micro-batches an epoch
    for r in results:
        assert r["units"] == 2 and r["steps"] == steps
        c = r["calls"]
        assert c["rs"] == c["after"] == steps * r["units"], c  # each reduce-scatter followed by one all-reduce, per step
        assert c["rs_numel"] == steps * params  # the whole gradient goes into the reduce-scatter within the pair
        assert c["after_numel"] == steps * params // 2  # and the all-reduce across the pairs moves a half: the shard


def test_fsdp_state_bytes_per_rank_are_half_at_two_ranks(tmp_path):
    one = spawn(_fsdp_counts, 1, tmp_path / "one", str(tmp_path / "one-run"), 1)[0]["bytes"]
    two = spawn(_fsdp_counts, 2, tmp_path / "two", str(tmp_path / "two-run"), 1)
    params = sum(p.numel() for p in make_model(TaskConfig(hidden=16, depth=1), seed=0).parameters()) * 4
    assert one["params"] == one["grads"] == params and one["optimizer"] >= 2 * params  # AdamW: exp_avg, exp_avg_sq
    for r in two:
        b = r["bytes"]
        assert b["params"] == b["grads"] == params // 2  # every dimension splits evenly across 2 ranks
        assert 0.49 < b["total"] / one["total"] < 0.52, (b, one)  # plus AdamW's unsharded step counters


class NormNet(nn.Module):
    """BatchNorm in the blocks (running statistics: buffers), a LayerNorm at the root after them, and
    a layer that never gets a gradient (no AdamW state for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU())
        self.norm, self.head, self.unused = nn.LayerNorm(64), nn.Linear(64, 8), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x)))


def _norm_net(rank: int, world: int, run_dir: str, dotted: dict) -> dict:
    from distrib import fit

    cfg = TaskData().replace(
        **{
            "run.dir": run_dir,
            "run.device": "cpu",
            "data.train_size": 512,
            "data.eval_size": 301,
            "train.batch_size": 16,
            "train.epochs": 2,
            "train.log_every": 8,
            "wandb.mode": "disabled",
            "ckpt.every": None,
            **dotted,
        }
    )
    train, ev = make_datasets(cfg.task, train_size=512, eval_size=301, seed=0)
    torch.manual_seed(0)
    model = NormNet()
    summary = fit(cfg, model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01), train_data=train, eval_data=ev)
    return {**summary, "checkpoints": [p.name for p in ck.candidates(__import__("pathlib").Path(run_dir) / "checkpoints")]}


def test_fsdp_with_buffers_an_unused_layer_and_no_reshard_ends_at_max_steps_resumes_and_matches_ddp(tmp_path):
    """BatchNorm buffers follow rank 0 as under DDP; a parameter with no optimizer state resumes;
    reshard_after_forward=false survives gathering model.pt; a run ended by max_steps mid-epoch is
    checkpointed there, so the same command with more steps continues it."""
    run = str(tmp_path / "fsdp")
    fsdp = {"dist.strategy": "fsdp", "dist.reshard_after_forward": False}
    first = spawn(_norm_net, 2, tmp_path / "a", run, {**fsdp, "train.max_steps": 20})[0]
    assert first["optimizer_steps"] == 20 and first["checkpoints"][0] == "step-000000020"  # 16 steps an epoch
    resumed = spawn(_norm_net, 2, tmp_path / "b", run, fsdp)[0]
    ddp = spawn(_norm_net, 2, tmp_path / "c", str(tmp_path / "ddp"), {"dist.find_unused_parameters": True})[0]
    assert resumed["optimizer_steps"] == ddp["optimizer_steps"] == 32
    assert resumed["params_sha256"] == ddp["params_sha256"]
    assert resumed["eval"]["count"] == 301 and resumed["eval"]["loss"] == pytest.approx(ddp["eval"]["loss"], abs=1e-6)
    # bf16: the BatchNorms compute in fp32 as units of their own, the root's LayerNorm takes bf16 again.
    bf16 = spawn(_norm_net, 2, tmp_path / "d", str(tmp_path / "bf16"), {**fsdp, "train.precision": "bf16"})[0]
    assert bf16["optimizer_steps"] == 32 and bf16["params_sha256"] != ddp["params_sha256"]
    assert bf16["eval"]["loss"] < ddp["eval"]["loss"] + 0.1  # not fp32's numbers, but trained as far


# ----------------------------------------------------------------------------- configuration


def test_fsdp_refuses_fp16_unknown_blocks_and_layouts_one_process_cannot_build_before_writing_anything(tmp_path):
    for extra, message in (
        (["--train.precision", "fp16"], "train.precision=fp16 with dist.strategy=fsdp"),
        (["--dist.fsdp_blocks", "Block"], "dist.fsdp_blocks=Block matches no submodule"),
        (["--dist.strategy", "zero3"], "dist.strategy='zero3' is not one of ddp, fsdp"),
        (["--dist.strategy", "FSDP"], "HINT: pass --dist.strategy fsdp"),
        (["--dist.fsdp_offload", "true"], "dist.fsdp_offload=true in one process"),
        (["--dist.replicate", "2"], "dist.replicate=2 does not divide the world size 1"),
        (["--train.activation_checkpointing", "all"], "train.activation_checkpointing='all' is not one of none, full, selective"),
    ):
        run = tmp_path / extra[-1]
        proc = run_train([*FSDP, *extra, "--train.epochs", "1", "--data.train_size", "64", "--run.dir", str(run)], check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr, proc.stderr[-2000:]
        assert not run.exists()


def _whole_to_shards(rank: int, world: int) -> float:
    """A model and AdamW trained whole (as a DDP checkpoint holds them), loaded into FSDP shards; one more step each."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from distrib.checkpoint.sharded import load_whole

    torch.manual_seed(0)
    whole = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    fresh = copy.deepcopy(whole)
    opt = torch.optim.AdamW(whole.parameters(), lr=0.05)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        whole(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    saved_model, saved_opt = copy.deepcopy(whole.state_dict()), copy.deepcopy(opt.state_dict())
    mesh = init_device_mesh("cpu", (world,))
    for layer in fresh:
        fully_shard(layer, mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    sharded_opt = torch.optim.AdamW(fresh.parameters(), lr=0.05)
    load_whole(fresh, saved_model)
    load_whole(sharded_opt, saved_opt)
    assert all(hasattr(v, "to_local") for s in sharded_opt.state.values() for k, v in s.items() if k != "step")
    for model, optimizer in ((whole, opt), (fresh, sharded_opt)):
        model(x).pow(2).mean().backward()  # the same batch on every rank: FSDP's averaged gradient is the whole one
        optimizer.step()
    return max((a - b.full_tensor()).abs().max().item() for a, b in zip(whole.parameters(), fresh.parameters()))


def test_a_whole_model_and_adamw_state_load_into_fsdp_shards_and_step_alike(tmp_path):
    assert max(spawn(_whole_to_shards, 2, tmp_path)) < 1e-6
