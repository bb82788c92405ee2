"""The loop on real gloo ranks through the library API: one all-reduce per step, exact logged
loss, exact-once evaluation, debug mode without a process group."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from distrib import fit
from distrib.cli.task import make_model
from distrib.errors import BatchError
from tests.helpers import TaskData


def _cfg(run_dir, **dotted):
    base = {"run.dir": str(run_dir), "run.device": "cpu", "task.hidden": 16, "task.depth": 1, "dist.timeout_s": 60}
    return TaskData().replace(**{**base, **dotted})


class NotTensors(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int):
        return object(), 1


def test_batch_that_is_not_tensors_fails_before_anything_is_written(tmp_path):
    cfg = _cfg(tmp_path / "never")
    model = make_model(cfg.task, seed=0)
    with pytest.raises(BatchError, match="Cannot collate a sample of type tuple.*HINT"):
        fit(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data=NotTensors())
    assert not (tmp_path / "never").exists()
