"""Any model and batch through `fit`: Hugging Face models with dict batches and their own loss,
token-exact losses over padded sequences, step functions with their own metrics, the pre-flight probe."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import distrib
from distrib import Config, fit
from tests.helpers import read_metrics, spawn
from tests.lm import Sequences, pad_collate, tiny_gpt2

pytest.importorskip("transformers")


def _cfg(run_dir: str, **dotted) -> Config:
    base = {"run.dir": run_dir, "run.device": "cpu", "wandb.mode": "disabled", "train.log_every": 2, "ckpt.every": None}
    return Config().replace(**{**base, **dotted})


# --------------------------------------------------------------------------- HF model vs a plain DDP loop


def _hf_fit(rank: int, world: int, run_dir: str) -> dict:
    model = tiny_gpt2()
    cfg = _cfg(run_dir, **{"train.batch_size": 4, "train.epochs": 2})
    summary = fit(
        cfg,
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=5e-3),
        train_data=Sequences(40, fixed=True),
        eval_data=Sequences(10, fixed=True, seed=1),
        collate_fn=pad_collate,
    )
    return {"params": {k: v.clone() for k, v in model.state_dict().items()}, "summary": summary}


def _hf_hand(rank: int, world: int) -> dict:
    """The loop a user writes by hand: DistributedSampler, DDP, model(**batch).loss."""
    torch.distributed.init_process_group("gloo")
    model = tiny_gpt2()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    data = Sequences(40, fixed=True)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=4, sampler=sampler, collate_fn=pad_collate)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in loader:
            ddp(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.distributed.destroy_process_group()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_hugging_face_model_trains_through_fit_with_no_glue_like_a_plain_ddp_loop(tmp_path):
    fitted = spawn(_hf_fit, 2, tmp_path, str(tmp_path / "run"))
    hand = spawn(_hf_hand, 2, tmp_path)
    start = tiny_gpt2().state_dict()
    for k, v in hand[0].items():
        torch.testing.assert_close(fitted[0]["params"][k], v, rtol=0, atol=2e-6)
    assert max((hand[0][k] - start[k]).abs().max().item() for k in start) > 1e-2  # training moved them far beyond that
    summary = fitted[0]["summary"]
    assert summary["optimizer_steps"] == 10 and summary["eval"]["count"] == 10
    assert "accuracy" not in summary["eval"] and summary["eval"]["perplexity"] == pytest.approx(2.718281828 ** summary["eval"]["loss"])
    # model.pt holds the model's own keys: it loads into a fresh GPT2LMHeadModel as it is.
    fresh = tiny_gpt2(seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "run" / "model.pt", weights_only=True))
    assert distrib.params_sha256(fresh) == summary["params_sha256"]
    lines = read_metrics(tmp_path / "run")
    assert all("accuracy" not in line and "perplexity" in line for line in lines)
    assert sum(line.get("tokens", 0) for line in lines if line["kind"] == "train") == 2 * 40 * 15  # shifted labels: 15 a row


# --------------------------------------------------------------------------- token-exact accumulation


def _token_fit(rank: int, world: int, run_dir: str, batch: int, accum: int, per_micro_mean: bool) -> dict:
    model = tiny_gpt2()
    cfg = _cfg(run_dir, **{"train.batch_size": batch, "train.grad_accum": accum, "train.epochs": 2})
    # A step function that returns the model's own loss, a mean over *its* micro-batch's tokens:
    # what a per-micro-batch mean gives (distrib then weights by samples, as it can know no better).
    naive = {"step_fn": lambda m, b: m(**b).loss} if per_micro_mean else {}
    fit(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), train_data=Sequences(48), collate_fn=pad_collate, **naive)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_padded_token_loss_is_exact_whatever_the_split(tmp_path):
    two_by_8 = spawn(_token_fit, 2, tmp_path, str(tmp_path / "a"), 8, 1, False)[0]
    one_by_16 = _token_fit(0, 1, str(tmp_path / "b"), 16, 1, False)
    one_by_8x2 = _token_fit(0, 1, str(tmp_path / "c"), 8, 2, False)
    assert _max_diff(two_by_8, one_by_16) < 2e-6
    assert _max_diff(one_by_8x2, one_by_16) < 2e-6
    # The test can fail: a per-micro-batch mean over tokens ends measurably elsewhere.
    naive = _token_fit(0, 1, str(tmp_path / "d"), 8, 2, True)
    assert _max_diff(naive, one_by_16) > 1e-4


# --------------------------------------------------------------------------- metrics that fit the task


# --------------------------------------------------------------------------- the pre-flight probe
