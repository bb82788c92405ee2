"""Callbacks fire at the same points on every rank; early stopping agrees across ranks and resumes bit-exact."""

from __future__ import annotations

import torch

from distrib import Callback, EarlyStopping, fit
from distrib.cli.task import make_datasets, make_model
from tests.helpers import TaskData, read_metrics, rewind, spawn


def _cfg(run_dir: str, **dotted):
    base = {
        "run.dir": run_dir,
        "run.device": "cpu",
        "task.hidden": 16,
        "task.depth": 1,
        "wandb.mode": "disabled",
        "data.train_size": 100,
        "data.eval_size": 40,
        "train.batch_size": 8,
        "dist.timeout_s": 60,
    }
    return TaskData().replace(**{**base, **dotted})


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_log(self, trainer, record):
        self.events.append(("log", record["step"], round(record["loss"], 12)))

    def on_eval(self, trainer, result):
        self.events.append(("eval", trainer.train.step, round(result["loss"], 12)))

    def on_epoch_end(self, trainer, epoch):
        self.events.append(("epoch_end", epoch))

    def on_checkpoint(self, trainer, step):
        self.events.append(("ckpt", step))

    def on_fit_end(self, trainer, summary):
        self.events.append(("fit_end", summary["optimizer_steps"]))


def _recorded(rank: int, world: int, run_dir: str) -> list[tuple]:
    cfg = _cfg(run_dir, **{"train.epochs": 2, "train.log_every": 3, "ckpt.every": 4})
    train, ev = make_datasets(cfg.task, train_size=100, eval_size=40, seed=0)
    model, rec = make_model(cfg.task, seed=0), Recorder()
    fit(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data=train, eval_data=ev, callbacks=[rec])
    return rec.events


def test_callbacks_fire_at_the_right_steps_on_every_rank(tmp_path):
    r0, r1 = spawn(_recorded, 2, tmp_path, str(tmp_path / "run"))
    assert r0 == r1  # the same hooks, steps and all-reduced numbers on both ranks
    # 50 samples a rank, batch 8: 7 steps an epoch (the last of 2 samples); logs every 3rd step and
    # at each epoch's tail; checkpoints every 4th step and at each epoch's end.
    assert [e[:2] for e in r0] == [
        ("log", 3),
        ("ckpt", 4),
        ("log", 6),
        ("log", 7),
        ("eval", 7),
        ("epoch_end", 0),
        ("ckpt", 7),
        ("ckpt", 8),
        ("log", 9),
        ("log", 12),
        ("ckpt", 12),
        ("log", 14),
        ("eval", 14),
        ("epoch_end", 1),
        ("ckpt", 14),
        ("fit_end", 14),
    ]
    logged = [(l["step"], round(l["loss"], 12)) for l in read_metrics(tmp_path / "run") if l["kind"] == "train"]
    assert logged == [(e[1], e[2]) for e in r0 if e[0] == "log"]


def _early(rank: int, world: int, run_dir: str) -> dict:
    # mode=max on the eval loss: the loss falls, so every eval after the first is "no better";
    # with patience 2 training ends after the third epoch of 6.
    cfg = _cfg(run_dir, **{"train.epochs": 6, "task.dropout": 0.1, "ckpt.keep": 100, "ckpt.every": None})
    train, ev = make_datasets(cfg.task, train_size=100, eval_size=40, seed=0)
    model = make_model(cfg.task, seed=0)
    return fit(
        cfg,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_data=train,
        eval_data=ev,
        callbacks=[EarlyStopping("loss", mode="max", patience=2)],
    )


def test_early_stopping_agrees_across_ranks_and_resumes_bit_exact(tmp_path):
    whole = spawn(_early, 2, tmp_path, str(tmp_path / "whole"))
    assert whole[0]["early_stopped"] and whole[1]["early_stopped"]
    assert whole[0]["optimizer_steps"] == whole[1]["optimizer_steps"] == 21  # 3 epochs of 7 steps, on both ranks
    assert whole[0]["params_sha256"] == whole[1]["params_sha256"]
    run = tmp_path / "cut"
    spawn(_early, 2, tmp_path, str(run))
    rewind(run, 14)  # as if the job died after epoch 1 (one eval without improvement so far)
    resumed = spawn(_early, 2, tmp_path, str(run))
    # The callback's counter came back with the checkpoint: it stops where the uninterrupted run did.
    assert resumed[0]["optimizer_steps"] == 21 and resumed[0]["params_sha256"] == whole[0]["params_sha256"]
    evals = [l for l in read_metrics(run) if l["kind"] == "eval"]
    assert [e["epoch"] for e in evals] == [0, 1, 2]  # each epoch's eval logged once
