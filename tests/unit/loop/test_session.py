"""The open API's blocks: your own loop on a Session ends where `fit` ends, at one process and many;
a Session has no side effects until it writes; checkpoints of your own objects resume bit-exact and
are loaded as data, never as code."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from distrib import Config, Session

pytest.importorskip("sklearn")


def _data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _own_loop(run_dir, *, batch: int, accum: int, epochs: int = 2) -> dict[str, torch.Tensor]:
    cfg = Config().replace(**{"run.dir": str(run_dir), "run.device": "cpu", "train.batch_size": batch, "train.grad_accum": accum})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with Session(cfg) as session:
        model, optimizer = session.setup(model, optimizer)
        train = session.train_loader(_data(30))
        while train.epoch < epochs:
            for mb in train:
                with session.no_backward_sync(model, enabled=not mb.last):
                    x, y = mb.batch
                    session.backward(F.cross_entropy(model(x), y) * mb.weight)
                if mb.last:
                    session.step(optimizer)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_accumulation_in_one_process_equals_the_big_batch_with_a_short_last_step(tmp_path):
    big = _own_loop(tmp_path / "a", batch=12, accum=1)  # 30 samples: steps of 12, 12, 6
    acc = _own_loop(tmp_path / "b", batch=4, accum=3)  # micro-batches 4+4+4, 4+4+4, 4+2
    start = _own_loop(tmp_path / "c", batch=12, accum=1, epochs=0)
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=0, atol=1e-6)
    assert max((big[k] - start[k]).abs().max().item() for k in big) > 1e-2
    assert not any((tmp_path / d).exists() for d in "abc")  # a Session that never logs or saves writes nothing


def test_a_session_that_only_checkpoints_starts_no_tracker_and_log_prints_on_rank_zero(tmp_path, capsys):
    from distrib import parse_config

    cfg = parse_config(["--run.dir", str(tmp_path / "run"), "--wandb.mode", "offline"])
    with Session(cfg) as session:
        assert (session.rank, session.world_size, session.is_rank_zero, session.is_main_process) == (0, 1, True, True)
        loader = session.train_loader(_data(8), batch_size=4)
        session.save({"train": loader, "w": torch.ones(2)})
    assert (tmp_path / "run" / "checkpoints").is_dir() and not (tmp_path / "run" / "wandb").exists()
    cfg = parse_config(["--run.dir", str(tmp_path / "logged"), "--wandb.mode", "disabled"])
    with Session(cfg) as session:
        loader = session.train_loader(_data(8), batch_size=4)
        for _ in loader:
            pass
        session.log({"loss": 0.25, "note": "x"})  # the loader's step by default
    assert "train step 2 | loss 0.25 | note x" in capsys.readouterr().out
    assert json.loads((tmp_path / "logged" / "metrics.jsonl").read_text()) == {"kind": "train", "step": 2, "loss": 0.25, "note": "x"}
