"""Streaming training data (an IterableDataset) on real gloo ranks with real DataLoader workers: each
sample of an epoch once, the same run as a map-style dataset, and a mid-epoch stop resumed bit-exact."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

from distrib import Session, fit
from distrib.cli.task import make_datasets, make_model
from distrib.errors import BatchError, ConfigError
from tests.helpers import TaskData


class Ids(IterableDataset):
    """Yields 0..n-1; declares its length unless `declare=False`; `short` stops it early."""

    def __init__(self, n: int, declare: bool = True, short: int | None = None) -> None:
        self.n, self.declare, self.short = n, declare, short

    def __len__(self) -> int:
        if not self.declare:
            raise TypeError("no len")
        return self.n

    def __iter__(self):
        yield from (torch.tensor(i) for i in range(self.short if self.short is not None else self.n))


class Resumable:
    """A stateful stream's protocol (as Hugging Face's and torchdata's streams have it): `state_dict()`
    while iterating says where it is, and the next iteration after `load_state_dict` goes on from
    there. Every iteration appends the index it starts reading at to `reads` (a file), so a test
    can tell a resume from the state (a start > 0) from a reread with a skip (a start at 0)."""

    reads: str | None = None

    def state_dict(self) -> dict:
        return {"next": self._next}

    def load_state_dict(self, state: dict) -> None:
        self._from = state["next"]

    def _resumed(self, n: int):
        first, self._from = getattr(self, "_from", 0), 0
        if self.reads:
            with open(self.reads, "a") as f:
                f.write(f"{first}\n")
        for i in range(first, n):
            self._next = i + 1
            yield i


class ResumableIds(Resumable, Ids):
    def __iter__(self):
        yield from (torch.tensor(i) for i in self._resumed(self.n))


def _cfg(run_dir, **dotted):
    base = {
        "run.dir": str(run_dir),
        "run.device": "cpu",
        "task.hidden": 16,
        "task.depth": 1,
        "dist.timeout_s": 60,
        "wandb.mode": "disabled",
        "train.log_every": 5,
        "data.shuffle": False,
    }
    return TaskData().replace(**{**base, **dotted})


class NumpyState(ResumableIds):
    def state_dict(self) -> dict:
        return {"next": np.int64(self._next)}  # saves, but a checkpoint could not load it back


class RefusingState(ResumableIds):
    def load_state_dict(self, state: dict) -> None:
        raise ValueError("format v2 expected")


def test_a_stream_state_a_checkpoint_cannot_hold_falls_back_to_the_skip_and_a_failing_load_is_named(tmp_path, caplog, monkeypatch):
    cfg = _cfg(tmp_path / "run", **{"train.batch_size": 4})

    def two_steps(loader) -> None:
        for mb in loader:
            if mb.last and loader.step == 2:
                break

    with Session(cfg) as session, caplog.at_level(logging.WARNING, logger="distrib"):
        monkeypatch.setattr(logging.getLogger("distrib"), "propagate", True)  # after the session set its logging up
        numpy = session.train_loader(NumpyState(40))
        two_steps(numpy)
        # No position to checkpoint (so no unloadable file), and one warning naming the value and the fix.
        assert numpy.rank_state_dict() is None
        assert "state_dict()['next'] holds a numpy.int64" in caplog.text and "int(x) for a numpy number" in caplog.text
        rest = [mb.batch for mb in numpy]  # the epoch's rest, then a whole epoch: plain batches, as the model expects
        rest += [mb.batch for mb in numpy]
        assert all(type(b) is torch.Tensor for b in rest) and len(rest) == 8 + 10
        good = session.train_loader(ResumableIds(40))
        two_steps(good)
        assert good.rank_state_dict()["position"] == ({"next": 8}, 8)
        refusing = session.train_loader(RefusingState(40))
        refusing.load_state_dict(good.state_dict())
        refusing.load_rank_state_dict(good.rank_state_dict())
        with pytest.raises(BatchError, match=r"\(RefusingState\).*load_state_dict raised ValueError: format v2 expected.*remove both"):
            next(iter(refusing))


def test_a_stream_needs_a_length_or_max_steps_and_fresh_workers(tmp_path):
    cfg = _cfg(tmp_path / "run")
    with Session(cfg) as session:
        with pytest.raises(ConfigError, match=r"no len\(\) and train.max_steps is not set.*__len__.*--train.max_steps"):
            session.train_loader(Ids(10, declare=False))
        with pytest.raises(ConfigError, match="counting every eval sample exactly once"):
            session.eval_loader(Ids(10))
    with Session(_cfg(tmp_path / "run2", **{"data.num_workers": 1, "data.persistent_workers": True})) as session:
        with pytest.raises(ConfigError, match="data.persistent_workers=true with a streaming"):
            session.train_loader(Ids(10))
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()
    train, _ = make_datasets(cfg.task, train_size=64, eval_size=8, seed=0)
    model = make_model(cfg.task, seed=0)
    with pytest.raises(ConfigError, match="train_data is a generator, neither a map-style Dataset .* read only once"):
        fit(_cfg(tmp_path / "run3"), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data=(s for s in train))
    assert not (tmp_path / "run3").exists()
