"""Any model and batch through `fit`: Hugging Face models with dict batches and their own loss,
token-exact losses over padded sequences, step functions with their own metrics, the pre-flight probe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import distrib
from distrib import Config, fit
from distrib.errors import BatchError
from tests.helpers import read_metrics

pytest.importorskip("transformers")


def _cfg(run_dir: str, **dotted) -> Config:
    base = {"run.dir": run_dir, "run.device": "cpu", "wandb.mode": "disabled", "train.log_every": 2, "ckpt.every": None}
    return Config().replace(**{**base, **dotted})


# --------------------------------------------------------------------------- HF model vs a plain DDP loop


# --------------------------------------------------------------------------- token-exact accumulation


# --------------------------------------------------------------------------- metrics that fit the task


class Regression(TensorDataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=g)
        super().__init__(x, x.sum(dim=1, keepdim=True))


def test_a_regression_logs_no_accuracy_and_step_metrics_are_exact_global_means(tmp_path):
    model = nn.Linear(4, 1)
    cfg = _cfg(str(tmp_path / "reg"), **{"train.batch_size": 7, "train.epochs": 1})
    summary = fit(
        cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_data=Regression(30), eval_data=Regression(11), loss_fn=F.mse_loss
    )
    lines = read_metrics(tmp_path / "reg")
    assert all("accuracy" not in line and "perplexity" not in line for line in lines)
    assert summary["eval"].keys() == {"loss", "count"} and summary["eval"]["count"] == 11

    def step(m, batch):  # lr 0: the metric is a function of the data alone, recomputable here
        x, y = batch
        err = (m(x) - y).abs()
        return F.mse_loss(m(x), y), {"mae": err.mean(), "big": ((err > 1).sum(), err.numel())}

    frozen = nn.Linear(4, 1)
    fit(
        _cfg(str(tmp_path / "mae"), **{"train.batch_size": 7, "train.epochs": 1, "train.log_every": 100}),
        model=frozen,
        optimizer=torch.optim.SGD(frozen.parameters(), lr=0.0),
        train_data=Regression(30),
        step_fn=step,
    )
    (line,) = read_metrics(tmp_path / "mae")
    x, y = Regression(30).tensors
    with torch.no_grad():
        err = (frozen(x) - y).abs()
    assert line["mae"] == pytest.approx(err.mean().item(), rel=1e-6)  # sample-weighted over 7+7+7+7+2
    assert line["big"] == (err > 1).double().mean().item()  # (sum, count): exact
    assert line["interval_samples"] == 30


# --------------------------------------------------------------------------- the pre-flight probe


class Dicts(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.randn(4), "y": torch.tensor(1)}


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"model": nn.Linear(4, 2), "train_data": Dicts()}, "model(**batch) on one batch of 8 samples, train.batch_size="),
        ({"model": nn.Linear(4, 2), "train_data": Regression(8)}, "loss_fn(model(inputs), labels)"),
        ({"model": nn.Linear(4, 1), "train_data": Regression(8), "step_fn": lambda m, b: (m(b[0]) - b[1]).abs()}, "step_fn must return a scalar loss"),
    ],
)
def test_a_call_that_cannot_work_fails_in_the_probe_before_anything_is_written(tmp_path, kwargs, needle):
    model = kwargs["model"]
    with pytest.raises(BatchError) as err:
        fit(_cfg(str(tmp_path / "never")), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    assert needle in str(err.value) and "HINT" in str(err.value)
    assert not (tmp_path / "never").exists()


def test_an_unknown_fit_argument_names_the_nearest_one(tmp_path):
    model = nn.Linear(4, 1)
    with pytest.raises(distrib.ConfigError, match="unknown argument 'colate_fn'. Did you mean 'collate_fn'"):
        fit(_cfg(str(tmp_path / "never")), model=model, train_data=Regression(8), colate_fn=None)
    assert not (tmp_path / "never").exists()


def test_an_optimizer_and_an_optim_section_together_are_refused(tmp_path):
    from distrib.cli.task import SECTIONS
    from distrib.config import config_class

    model = nn.Linear(4, 1)
    cfg = config_class(SECTIONS)().replace(**{"run.dir": str(tmp_path / "never"), "run.device": "cpu"})
    with pytest.raises(distrib.ConfigError, match="`optim` section too"):
        fit(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data=Regression(8), loss_fn=F.mse_loss)
    assert not (tmp_path / "never").exists()
