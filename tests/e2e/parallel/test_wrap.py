"""Model wrapping on real gloo ranks: DDP options, SyncBatchNorm, unwrap; precision and clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distrib import distributed, fit
from distrib.cli.task import make_datasets, make_model
from distrib.config import DistConfig
from distrib.parallel.wrap import unwrap_model, wrap_model
from tests.helpers import TaskData, spawn


def _wrap(rank: int, world: int, device: str) -> dict:
    cfg = DistConfig(find_unused_parameters=True, static_graph=False, gradient_as_bucket_view=True, bucket_cap_mb=1.0, sync_batchnorm=device == "cuda")
    with distributed(device=device) as rt:
        model = wrap_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), rt, cfg)
        out = {
            "ddp": isinstance(model, DDP),
            "find_unused": model.find_unused_parameters,
            "bucket_view": model.gradient_as_bucket_view,
            "bucket_bytes": model.bucket_bytes_cap,
            "syncbn": isinstance(unwrap_model(model)[1], nn.SyncBatchNorm),
            "device": str(next(model.parameters()).device),
            "keys": sorted(unwrap_model(model).state_dict()),
        }
        # With the default config the buckets are DDP's own, the small first bucket included.
        module = nn.Sequential(nn.Linear(4, 4))
        default, plain = wrap_model(module, rt, DistConfig()), DDP(module)
        out["default_buckets"] = default._bucket_config == plain._bucket_config
        out["first_bucket_bytes"] = default._bucket_config.first_bucket_bytes_cap
        del model, default, plain
        return out


def test_ddp_options_on_two_gloo_ranks(tmp_path):
    for r in spawn(_wrap, 2, tmp_path, "cpu"):
        assert r["ddp"] and r["find_unused"] and r["bucket_view"] and not r["syncbn"]
        assert r["bucket_bytes"] == 1024 * 1024
        assert r["default_buckets"] and r["first_bucket_bytes"] == torch.distributed._DEFAULT_FIRST_BUCKET_BYTES < 25 * 2**20
        assert not any(k.startswith("module.") for k in r["keys"])


def _fit(tmp_path, name: str, lr: float = 0.5, **dotted) -> tuple[dict, nn.Module, dict]:
    cfg = TaskData().replace(
        **{
            "run.dir": str(tmp_path / name),
            "run.device": "cpu",
            "data.train_size": 512,
            "train.batch_size": 32,
            "train.epochs": 1,
            "task.hidden": 16,
            "task.depth": 1,
            **dotted,
        }
    )
    train, ev = make_datasets(cfg.task, train_size=512, eval_size=64, seed=0)
    model = make_model(cfg.task, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    summary = fit(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), train_data=train, eval_data=ev)
    return summary, model, start


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    summary, _, _ = _fit(tmp_path, precision, **{"train.precision": precision})
    assert summary["optimizer_steps"] == 16 and summary["eval"]["count"] == 64
    assert 0.0 < summary["eval"]["loss"] < 2.0  # finite and below the ~2.08 of an untrained 8-class model


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clipping_bounds_every_step(tmp_path, precision):
    # SGD moves each step by lr * clipped gradient, so |Δθ| <= steps * lr * clip; unclipped moves far more.
    clip, lr = 1e-3, 1.0
    summary, model, start = _fit(tmp_path, f"clip-{precision}", lr=lr, **{"train.clip_grad_norm": clip, "train.precision": precision})
    moved = torch.sqrt(sum(((p - start[k]) ** 2).sum() for k, p in model.state_dict().items())).item()
    assert 0 < moved <= summary["optimizer_steps"] * lr * clip * (1 + 1e-3)
    _, free_model, free_start = _fit(tmp_path, f"free-{precision}", lr=lr, **{"train.precision": precision})
    free = torch.sqrt(sum(((p - free_start[k]) ** 2).sum() for k, p in free_model.state_dict().items())).item()
    assert free > 10 * moved


def test_max_steps_counts_optimizer_steps(tmp_path):
    summary, _, _ = _fit(tmp_path, "max", **{"train.max_steps": 5, "train.grad_accum": 2})
    assert summary["optimizer_steps"] == 5 and summary["samples_seen"] == 5 * 2 * 32
    assert summary["epochs_completed"] == 0 and summary["eval"]["count"] == 64


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_syncbn_and_device_ids_on_two_gpus(tmp_path):
    results = spawn(_wrap, 2, tmp_path, "cuda")
    assert [r["device"] for r in results] == ["cuda:0", "cuda:1"]
    assert all(r["ddp"] and r["syncbn"] for r in results)
