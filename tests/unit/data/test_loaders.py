"""Samplers and loaders: shuffling per epoch, disjoint shards, world-size-invariant global batches,
exact-once evaluation, distinct worker seeds."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from distrib.data.loaders import LoaderOptions, TrainLoader, eval_dataloader
from distrib.data.sampling import EvalSampler
from distrib.errors import ConfigError


def ids(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n), torch.zeros(n, dtype=torch.long))


def loader(n: int, world: int, rank: int, batch: int, grad_accum: int = 1, **kw) -> TrainLoader:
    return TrainLoader(
        ids(n),
        world_size=world,
        rank=rank,
        seed=kw.pop("seed", 0),
        shuffle=True,
        grad_accum=grad_accum,
        drop_last=kw.pop("drop_last", False),
        opts=LoaderOptions(batch_size=batch, **kw),
    )


def at(ld: TrainLoader, epoch: int, skip: int = 0) -> TrainLoader:
    """The loader positioned as a checkpoint taken `skip` samples into `epoch` would leave it."""
    ld.load_state_dict({"epoch": epoch, "epoch_samples": skip, "step": 0, "samples_seen": 0, "world_size": ld.world_size})
    return ld


def epoch_batches(ld: TrainLoader, epoch: int, skip: int = 0) -> list[list[int]]:
    return [mb.batch[0].tolist() for mb in at(ld, epoch, skip)]


def test_each_epoch_has_a_new_order_and_ranks_are_disjoint():
    r0, r1 = loader(100, 2, 0, 10), loader(100, 2, 1, 10)
    e0 = [sum(epoch_batches(r, 0), []) for r in (r0, r1)]
    e1 = [sum(epoch_batches(r, 1), []) for r in (r0, r1)]
    assert e0[0] != e1[0] and e0[1] != e1[1]
    for shards in (e0, e1):
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(100))
    assert epoch_batches(r0, 0) == epoch_batches(r0, 0)  # same epoch, same order


@pytest.mark.parametrize("n", [96, 100])
def test_global_batches_do_not_depend_on_world_size(n):
    one = epoch_batches(loader(n, 1, 0, 32), 3)
    two = [epoch_batches(loader(n, 2, r, 16), 3) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1])
    for b, global_batch in enumerate(one):
        assert sorted(global_batch) == sorted(two[0][b] + two[1][b])


def test_micro_batch_sizes_match_the_loader():
    for n, world, batch, drop in [(100, 2, 16, False), (100, 2, 16, True), (7, 3, 2, False), (64, 1, 64, False)]:
        ld = loader(n, world, 0, batch, drop_last=drop)
        assert [len(b) for b in epoch_batches(ld, 0)] == ld.micro_batch_sizes()
        ld = loader(n, world, 0, batch, drop_last=drop)
        assert [len(b) for b in epoch_batches(ld, 0, skip=batch)] == ld.micro_batch_sizes(batch if ld.num_batches(batch) else 0)
        # A position at the end of an epoch (every sample consumed) continues with the next epoch.
        assert ld.current_epoch == (0 if batch < ld.samples_per_rank else 1)


def test_micro_batches_carry_exact_weights_and_the_position_advances_per_step():
    ld = loader(100, 2, 0, 16, grad_accum=2)  # 50 a rank: steps of 16+16 and 16+2
    mbs = list(at(ld, 0))
    assert [(mb.size, mb.last) for mb in mbs] == [(16, False), (16, True), (16, False), (2, True)]
    assert [mb.weight for mb in mbs] == [0.5, 0.5, 16 / 18, 2 / 18]
    assert (ld.step, ld.samples_seen, ld.epoch, ld.current_epoch) == (2, 100, 1, 0)
    split = {"step": 0, "world_size": 2, "micro_batch": 16, "grad_accum": 2}
    assert ld.state_dict() == {
        **{"epoch": 1, "epoch_samples": 0, "step": 2, "samples_seen": 100, "world_size": 2},
        **{"global_batch": 64, "dataset_size": 100, "splits": [split]},
    }


def test_skip_resumes_at_the_next_unseen_sample():
    ld = loader(100, 2, 1, 8)
    full = sum(epoch_batches(ld, 2), [])
    assert sum(epoch_batches(ld, 2, skip=24), []) == full[24:]


@pytest.mark.parametrize("n, world", [(1001, 2), (1001, 3), (5, 4), (1, 1)])
def test_eval_sees_every_sample_exactly_once(n, world):
    seen = [i for r in range(world) for i in EvalSampler(n, num_replicas=world, rank=r)]
    assert sorted(seen) == list(range(n))
    got = [i for r in range(world) for b in eval_dataloader(ids(n), world_size=world, rank=r, opts=LoaderOptions(batch_size=64)) for i in b[0].tolist()]
    assert sorted(got) == list(range(n))


def test_dataset_smaller_than_world_size():
    with pytest.raises(ConfigError, match="has 3 samples but the job has 4 processes"):
        loader(3, 4, 0, 1)
    with pytest.raises(ConfigError, match="eval dataset has 1 samples"):
        eval_dataloader(ids(1), world_size=2, rank=0, opts=LoaderOptions(batch_size=1))


def test_drop_last_with_no_full_batch():
    with pytest.raises(ConfigError, match="make no full batch"):
        loader(10, 2, 0, 8, drop_last=True)
