"""The non-finite guard in one process: `error` stops before any checkpoint holds the bad step, `skip`
drops it and trains on, and neither reads the device on steps that are not logged."""

from __future__ import annotations

import json
import traceback

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import Dataset

from distrib import Config, fit
from distrib.checkpoint import store as ck
from distrib.errors import NonFiniteError

BAD = 51  # at 2 ranks with 4 samples each and no shuffle, rank 1's sample in step 7; at 1 rank with 8, step 7 too


class Points(Dataset):
    """64 samples of a 2-class problem; sample BAD is NaN, like a corrupt record."""

    def __init__(self, bad: int | None = BAD) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        if bad is not None:
            self.x[bad] = float("nan")

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def run(tmp_path, mode: str, *, batch: int = 8, fused: bool = False, data: Dataset | None = None, **dotted):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused or None)
    settings = {
        "run.dir": str(tmp_path / "run"),
        "run.device": "cpu",
        "wandb.mode": "disabled",
        "train.batch_size": batch,
        "train.epochs": 1,
        "data.shuffle": False,
        "train.log_every": 4,
        "ckpt.every": 1,
        "ckpt.keep": 100,
        "ckpt.async": False,
        "train.nonfinite": mode,
        **dotted,
    }
    return fit(Config().replace(**settings), model=model, train_data=data or Points(), optimizer=optimizer), model


def saved_model(run_dir, step: int) -> dict[str, torch.Tensor]:
    return ck.load_file(ck.step_dir(run_dir / "checkpoints", step) / "state.pt")["objects"]["model"]


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_error_stops_at_the_bad_step_and_no_checkpoint_holds_it(tmp_path, fused, capsys):
    with pytest.raises(NonFiniteError) as raised:
        run(tmp_path, "error", fused=fused)
    text = str(raised.value)
    assert raised.value.exit_code == 1
    assert "the gradients of optimizer step 7 are not finite" in text, text
    assert "rank 0's loss was the first not finite, at step 7" in text and "dataset indices [48, 49, 50, 51, 52, 53, 54, 55]" in text
    newest = ck.newest_good(tmp_path / "run" / "checkpoints")
    assert newest is not None and newest[0].name == "step-000000006"  # step 7 was never saved
    assert f"The last good checkpoint is {newest[0]}" in text
    for step in range(1, 7):
        assert all(torch.isfinite(t).all() for t in saved_model(tmp_path / "run", step).values())


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_skip_drops_the_bad_step_everywhere_and_trains_on(tmp_path, fused):
    summary, model = run(tmp_path, "skip", fused=fused)
    assert summary["skipped_steps"] == [7] and summary["optimizer_steps"] == 8
    at6, at7, at8 = (saved_model(tmp_path / "run", s) for s in (6, 7, 8))
    assert all(torch.equal(at6[k], at7[k]) for k in at6)  # the update of step 7 was dropped: not one bit moved
    assert not all(torch.equal(at7[k], at8[k]) for k in at7)  # and step 8 trained
    assert all(torch.isfinite(p).all() for p in model.parameters())
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("skipped_steps") for line in lines if line["kind"] == "train"] == [None, [7]]


def test_skip_stops_after_max_skipped_steps_in_a_row(tmp_path):
    data = Points(bad=None)
    data.x[48:64] = float("nan")  # steps 7 and 8: every sample bad
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row, up to step 8, had non-finite gradients"):
        run(tmp_path, "skip", data=data, **{"train.max_skipped_steps": 2})


def test_a_clean_run_is_the_same_with_either_mode(tmp_path):
    error, _ = run(tmp_path / "a", "error", data=Points(bad=None))
    skip, _ = run(tmp_path / "b", "skip", data=Points(bad=None))
    assert error["params_sha256"] == skip["params_sha256"] and error["skipped_steps"] == skip["skipped_steps"] == []


class _HostReads(TorchFunctionMode):
    """Counts what reads a tensor's value on the host outside the optimizer: on a GPU each one is a device sync.

    torch's own non-fused optimizers read their step counter (`_get_value`), which lives on the host;
    those are the optimizer's, in a plain loop too, and not counted.
    """

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__}

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS and not any("torch/optim/" in frame.filename for frame in traceback.extract_stack()):
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_the_guard_reads_nothing_on_the_host_between_log_intervals(tmp_path, fused):
    from distrib import Session

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused or None)
    cfg = Config().replace(
        **{"run.dir": str(tmp_path / "run"), "run.device": "cpu", "wandb.mode": "disabled", "train.batch_size": 8, "data.shuffle": False, "train.grad_accum": 2}
    )
    with Session(cfg) as session:
        model, optimizer = session.setup(model, optimizer)
        loader = session.train_loader(Points())
        batches = list(loader)
        counter = _HostReads()
        with counter:
            for mb in batches:
                with session.no_backward_sync(model, enabled=not mb.last):
                    loss = nn.functional.cross_entropy(model(mb.batch[0]), mb.batch[1])
                    session.backward(loss * mb.weight)
                if mb.last:
                    session.step(optimizer)
        assert counter.reads == 0
        with pytest.raises(NonFiniteError, match="optimizer step 4"):  # the NaN sample is in step 4 of 8 here
            session.check_steps()


def test_fp16s_own_drops_are_counted_as_skips_and_do_not_stop_the_run(tmp_path):
    summary, model = run(tmp_path, "error", **{"train.precision": "fp16"})  # GradScaler drops step 7 itself
    assert 7 in summary["skipped_steps"] and summary["optimizer_steps"] == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
