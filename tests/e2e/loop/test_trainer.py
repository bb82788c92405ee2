"""The loop on real gloo ranks through the library API: one all-reduce per step, exact logged
loss, exact-once evaluation, debug mode without a process group."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from distrib import Session, Trainer, fit
from distrib.cli.task import make_datasets, make_model
from distrib.parallel.wrap import ddp_of
from tests.helpers import TaskData, spawn


def _cfg(run_dir, **dotted):
    base = {"run.dir": str(run_dir), "run.device": "cpu", "task.hidden": 16, "task.depth": 1, "dist.timeout_s": 60}
    return TaskData().replace(**{**base, **dotted})


class Counter:
    calls = 0


def _counting_hook(state: Counter, bucket):
    state.calls += 1
    return allreduce_hook(None, bucket)


def _count_allreduces(rank: int, world: int, run_dir: str, accum: int) -> dict:
    cfg = _cfg(run_dir, **{"data.train_size": 200, "train.batch_size": 8, "train.grad_accum": accum, "train.epochs": 2, "train.log_every": 3})
    train, _ = make_datasets(cfg.task, train_size=200, eval_size=8, seed=0)
    model = make_model(cfg.task, seed=0)
    with Session(cfg) as session:
        trainer = Trainer(session, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data=train)
        trainer.prepare()
        counter = Counter()
        ddp_of(trainer.model).register_comm_hook(counter, _counting_hook)
        summary = trainer.fit()
        buckets = len(ddp_of(trainer.model).reducer._get_zeros_like_grad_buckets())
    return {"calls": counter.calls, "steps": summary["optimizer_steps"], "buckets": buckets}


@pytest.mark.parametrize("world, accum", [(2, 1), (2, 4), (4, 4)])
def test_exactly_one_allreduce_per_optimizer_step(tmp_path, world, accum):
    results = spawn(_count_allreduces, world, tmp_path, str(tmp_path / "run"), accum)
    # 200 samples over the ranks, batch 8: 2 ranks 13 micro-batches an epoch (the last holds 4), 4 ranks 7 (the last 2).
    micro = -(-(200 // world) // 8)
    steps = 2 * -(-micro // accum)
    for r in results:
        assert r["buckets"] == 1
        assert r["steps"] == steps
        assert r["calls"] == steps, f"{r['calls']} all-reduces for {steps} optimizer steps ({micro * 2} micro-batches)"


def _train_lr0(rank: int, world: int, run_dir: str) -> None:
    # lr = 0 keeps the model fixed, so every logged loss can be recomputed from the data order alone.
    cfg = _cfg(run_dir, **{"data.train_size": 100, "train.batch_size": 8, "train.epochs": 2, "train.log_every": 2})
    train, _ = make_datasets(cfg.task, train_size=100, eval_size=8, seed=0)
    model = make_model(cfg.task, seed=0)
    fit(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), train_data=train)


def test_logged_loss_is_the_global_mean_recomputed_independently(tmp_path):
    run = tmp_path / "run"
    spawn(_train_lr0, 2, tmp_path, str(run))
    cfg = _cfg(run)
    (x, y), model = make_datasets(cfg.task, train_size=100, eval_size=8, seed=0)[0].tensors, make_model(cfg.task, seed=0)
    with torch.no_grad():
        per_sample = F.cross_entropy(model(x), y, reduction="none").double()
        correct = (model(x).argmax(1) == y).double()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Logged every 2nd global step, plus each epoch's tail (7 steps an epoch: 6 of 16 samples, 1 of 4).
    assert [(l["epoch"], l["step"]) for l in lines] == [(0, 2), (0, 4), (0, 6), (0, 7), (1, 8), (1, 10), (1, 12), (1, 14)]
    prev = 0
    for line in lines:
        epoch = line["epoch"]
        perm = torch.randperm(100, generator=torch.Generator().manual_seed(0 + epoch))  # DistributedSampler's order
        # Global step s (1-based) is the epoch's k-th step, k = s-1-7*epoch: samples perm[16k : 16k+16].
        ks = [s - 1 - 7 * epoch for s in range(prev + 1, line["step"] + 1)]
        idx = torch.cat([perm[16 * k : 16 * k + 16] for k in ks])
        assert line["interval_samples"] == len(idx)
        assert line["loss"] == pytest.approx(per_sample[idx].mean().item(), rel=1e-6)
        assert line["accuracy"] == pytest.approx(correct[idx].mean().item(), abs=1e-12)
        prev = line["step"]
    assert lines[-1]["samples"] == 200


def _evaluate(rank: int, world: int, run_dir: str) -> dict:
    cfg = _cfg(run_dir, **{"data.eval_size": 1001, "train.batch_size": 64})
    train, ev = make_datasets(cfg.task, train_size=64, eval_size=1001, seed=0)
    model = make_model(cfg.task, seed=0)
    with Session(cfg) as session:
        trainer = Trainer(session, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data=train, eval_data=ev)
        trainer.prepare()
        return trainer.evaluate()


@pytest.mark.parametrize("world", [2, 4])
def test_eval_counts_every_sample_once_and_matches_one_process(tmp_path, world):
    two = spawn(_evaluate, world, tmp_path, str(tmp_path / "two"))
    one = _evaluate(0, 1, str(tmp_path / "one"))
    cfg = _cfg(tmp_path)
    _, ev = make_datasets(cfg.task, train_size=64, eval_size=1001, seed=0)
    with torch.no_grad():
        logits = make_model(cfg.task, seed=0)(ev.tensors[0])
    direct_loss = F.cross_entropy(logits, ev.tensors[1], reduction="none").double().mean().item()
    direct_acc = (logits.argmax(1) == ev.tensors[1]).double().mean().item()
    for r in (*two, one):
        assert r["count"] == 1001
        assert r["accuracy"] == direct_acc
        assert r["loss"] == pytest.approx(direct_loss, rel=1e-6)
    assert two[0] == two[1]


def test_debug_mode_has_no_process_group(tmp_path):
    seen = []

    def loss_fn(out, y):
        seen.append((tdist.is_initialized(), torch.is_anomaly_enabled(), torch.are_deterministic_algorithms_enabled()))
        return F.cross_entropy(out, y)

    cfg = _cfg(tmp_path / "dbg", **{"debug": True, "data.num_workers": 2, "train.debug_steps": 3})
    train, ev = make_datasets(cfg.task, train_size=256, eval_size=32, seed=0)
    model = make_model(cfg.task, seed=0)
    summary = fit(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data=train, eval_data=ev, loss_fn=loss_fn)
    assert summary["optimizer_steps"] == 3 and summary["world_size"] == 1 and summary["launcher"] == "single"
    assert seen and set(seen) == {(False, True, True)}
    assert not torch.is_anomaly_enabled() and not torch.are_deterministic_algorithms_enabled()  # restored
