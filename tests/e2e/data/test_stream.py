"""Streaming training data (an IterableDataset) on real gloo ranks with real DataLoader workers: each
sample of an epoch once, the same run as a map-style dataset, and a mid-epoch stop resumed bit-exact."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from distrib import Callback, Session, fit
from distrib.cli.task import make_datasets, make_model
from tests.helpers import spawn
from tests.unit.data.test_stream import Ids, Resumable, ResumableIds, _cfg  # the helpers both halves of this test module use


class TaskStream(IterableDataset):
    """The built-in task's training set as a stream, in index order."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        yield from (self.base[i] for i in range(len(self.base)))


class ResumableTaskStream(Resumable, TaskStream):
    def __iter__(self):
        yield from (self.base[i] for i in self._resumed(len(self.base)))


def _reads(path) -> list[int]:
    return sorted(int(x) for x in open(path).read().split()) if path.exists() else []


def _epoch_ids(rank: int, world: int, run_dir: str, n: int, workers: int) -> dict:
    cfg = _cfg(run_dir, **{"data.num_workers": workers, "train.batch_size": 8, "train.grad_accum": 2})
    out: dict = {}

    def read(loader, stop_at=None) -> dict:
        ids, sizes = [], []
        for mb in loader:
            ids += mb.batch.tolist()
            sizes.append(mb.size)
            if mb.last and loader.step == stop_at:
                break
        return {"ids": ids, "sizes": sizes, "steps": loader.step, "epoch_done": loader.epoch_done}

    with Session(cfg) as session:
        for name, skip_steps in (("whole", 0), ("resumed", 7)):
            loader = session.train_loader(Ids(n))
            if skip_steps:  # a checkpoint's position, as a resume loads it
                loader.load_state_dict(
                    {"epoch": 0, "epoch_samples": skip_steps * 16, "step": skip_steps, "samples_seen": skip_steps * 16 * world, "world_size": world}
                )
            out[name] = read(loader)
        # A stateful stream, stopped after 7 steps and resumed from its own state in a fresh loader.
        stream = ResumableIds(n)
        stream.reads = f"{run_dir}-reads-{rank}"
        first = session.train_loader(stream)
        head = read(first, stop_at=7)
        position, rank_part = first.state_dict(), first.rank_state_dict()
        Path(stream.reads).unlink()
        again = session.train_loader(stream)
        again.load_state_dict(position)
        again.load_rank_state_dict(rank_part)
        out["stateful"] = {"head": head, "rest": read(again), "reads": _reads(Path(stream.reads))}
    return out


@pytest.mark.parametrize("n", [1000, 1003])
def test_two_ranks_two_workers_see_every_sample_of_an_epoch_once_and_a_resume_skips_what_was_seen(tmp_path, n):
    results = spawn(_epoch_ids, 2, tmp_path, str(tmp_path / "run"), n, 2)
    whole = [r["whole"] for r in results]
    counts = collections.Counter(i for r in whole for i in r["ids"])
    assert set(counts) == set(range(n))
    # 1000 splits evenly: each id exactly once. 1003 does not: like DistributedSampler, the last
    # round repeats the stream's first sample on the short rank.
    assert sorted(k for k, c in counts.items() if c > 1) == ([] if n == 1000 else [0]) and max(counts.values()) <= 2
    for rank, r in enumerate(whole):
        assert r["ids"] == [(rank + 2 * k) % n for k in range(len(r["ids"]))]  # the rank's share, in the stream's order
        assert r["epoch_done"] and sum(r["sizes"]) == -(-n // 2)
    assert whole[0]["sizes"] == whole[1]["sizes"]  # same micro-batches on every rank: no rank waits alone
    for rank, r in enumerate(results):  # resumed after 7 steps of 2 x 8: exactly the rest, in the same order
        assert r["resumed"]["ids"] == r["whole"]["ids"][7 * 16 :] and r["resumed"]["steps"] == r["whole"]["steps"]
        stateful = r["stateful"]
        assert stateful["head"]["ids"] == r["whole"]["ids"][: 7 * 16] and stateful["head"]["steps"] == 7
        assert stateful["rest"]["ids"] == r["whole"]["ids"][7 * 16 :] and stateful["rest"]["steps"] == r["whole"]["steps"]
        # Both workers read on from the stream's own state: just past this rank's 112th sample, stream
        # index rank + 111 x 2. With 1003 samples rank 1's rest ends with the padding from the stream's
        # start, so it reads from 0 and skips instead.
        padded = n == 1003 and rank == 1
        assert stateful["reads"] == ([0, 0] if padded else [rank + 111 * 2 + 1] * 2)


def _fit(rank: int, world: int, run_dir: str, stream: str, stop_at: int | None, workers: int) -> dict:
    cfg = _cfg(
        run_dir,
        **{
            "data.train_size": 640,
            "train.batch_size": 8,
            "train.grad_accum": 2,
            "train.epochs": 2,
            "data.num_workers": workers,
            "task.dropout": 0.1,
            "ckpt.every": None,
        },
    )
    train, ev = make_datasets(cfg.task, train_size=640, eval_size=64, seed=0)
    model = make_model(cfg.task, seed=0)
    data = {"map": train, "plain": TaskStream(train), "stateful": ResumableTaskStream(train)}[stream]
    data.reads = f"{run_dir}-reads"

    class StopAt(Callback):
        def on_log(self, trainer, record):
            if stop_at is not None and trainer.train.step >= stop_at:
                trainer.stop.set()

    return fit(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data=data, eval_data=ev, callbacks=[StopAt()])


def test_a_stream_stopped_mid_epoch_and_resumed_with_workers_ends_as_the_map_style_run(tmp_path):
    """The stream (2 DataLoader workers per rank), stopped mid-epoch and resumed, ends bit-exact where the
    map-style dataset in the same order (no workers, never stopped) does: the share, the order and the
    resume are all exact, whether the resume skips what was read (a plain stream) or loads the
    stream's own state (a stateful one)."""
    mapped = spawn(_fit, 2, tmp_path / "map", str(tmp_path / "map-run"), "map", None, 0)[0]
    assert mapped["samples_seen"] == 2 * 640 and mapped["optimizer_steps"] == 2 * 20
    for kind in ("plain", "stateful"):
        run = str(tmp_path / f"{kind}-stopped")
        stopped = spawn(_fit, 2, tmp_path / f"{kind}-stop", run, kind, 5, 2)[0]
        # Requested in step 5's log, agreed at the next log interval: mid-epoch (20 steps an epoch).
        assert stopped["stopped"] and stopped["optimizer_steps"] == 10
        Path(f"{run}-reads").unlink(missing_ok=True)
        resumed = spawn(_fit, 2, tmp_path / f"{kind}-resume", run, kind, None, 2)[0]
        assert resumed["samples_seen"] == mapped["samples_seen"] and resumed["optimizer_steps"] == mapped["optimizer_steps"]
        assert resumed["params_sha256"] == mapped["params_sha256"], kind
        if kind == "stateful":
            # Epoch 0's rest: each rank's 2 workers load the state saved in its checkpoint file, just past
            # its 160th sample (stream index rank + 159 x 2). From the start: epoch 1 (4 workers) and
            # the pre-flight probe's first batch (each rank's main process).
            assert _reads(Path(f"{run}-reads")) == [0] * 6 + [319, 319, 320, 320]


def _endless(rank: int, world: int, run_dir: str, short: int | None) -> dict:
    cfg = _cfg(run_dir, **{"train.batch_size": 4, "train.max_steps": 6, "train.epochs": 100})
    with Session(cfg) as session:
        loader = session.train_loader(Ids(10**9, declare=False, short=short))
        ids = [i for mb in loader for i in mb.batch.tolist()]
    return {"ids": ids, "steps": loader.step}


def test_a_stream_without_len_reads_max_steps_of_it_and_says_when_it_ends_early(tmp_path):
    results = spawn(_endless, 2, tmp_path, str(tmp_path / "run"), None)
    assert sorted(i for r in results for i in r["ids"]) == list(range(6 * 4 * 2)) and results[0]["steps"] == 6
    with pytest.raises(Exception, match="The training stream ended after 20 samples"):
        spawn(_endless, 2, tmp_path / "short", str(tmp_path / "short-run"), 20)
