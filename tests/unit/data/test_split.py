"""`train.global_batch_size`: its split over each world size, and that every split trains the same samples
in each optimizer step (before and after a resume onto another world size)."""

from __future__ import annotations

import pytest
import torch

from distrib.checkpoint.resume import trajectory_changes
from distrib.config import Config
from distrib.data.loaders import LoaderOptions, TrainLoader
from distrib.data.split import small_micro_batch_note, split_global_batch
from distrib.errors import ConfigError
from tests.unit.data.test_loaders import loader


@pytest.mark.parametrize(
    ("world", "micro", "accum"),
    [(1, 16, 4), (2, 16, 2), (4, 16, 1), (8, 8, 1), (16, 4, 1), (64, 1, 1)],
)
def test_the_split_takes_the_largest_micro_batch_the_cap_allows(world, micro, accum):
    split = split_global_batch(64, max_micro_batch=16, world_size=world)
    assert (split.micro_batch, split.grad_accum) == (micro, accum)
    assert split.micro_batch * split.grad_accum * world == 64


def test_an_uneven_share_takes_equal_micro_batches_and_a_note_names_a_better_global_batch():
    split = split_global_batch(24, max_micro_batch=16, world_size=1)
    assert (split.micro_batch, split.grad_accum) == (12, 2) and small_micro_batch_note(split, 16) is None
    prime = split_global_batch(68, max_micro_batch=16, world_size=1)  # 68 = 4 x 17
    assert (prime.micro_batch, prime.grad_accum) == (4, 17)
    assert "a global batch of 64 splits into micro-batches of 16" in (small_micro_batch_note(prime, 16) or "")


@pytest.mark.parametrize(("world", "hint"), [(3, "63 or 66, or run on 2 or 4 processes"), (128, "128, or run on 64 processes")])
def test_a_global_batch_that_does_not_split_names_the_nearest_that_do(world, hint):
    with pytest.raises(ConfigError, match=f"global_batch_size=64 does not split evenly over {world} processes.*{hint}"):
        split_global_batch(64, max_micro_batch=16, world_size=world)


def test_grad_accum_with_a_global_batch_is_refused():
    with pytest.raises(ConfigError, match="train.grad_accum=2 with train.global_batch_size=64.*drop --train.grad_accum"):
        Config().replace(**{"train.global_batch_size": 64, "train.grad_accum": 2})
    with pytest.raises(ConfigError, match="ckpt.elastic='loose' is not one of warn, strict"):
        Config().replace(**{"ckpt.elastic": "loose"})


def _steps(n: int, world: int, state: dict | None = None, until: int | None = None) -> list[list[int]]:
    """Each optimizer step's samples over all ranks (sorted), for an epoch at `world` ranks with a global batch of 64."""
    split = split_global_batch(64, max_micro_batch=16, world_size=world)
    ranks = [loader(n, world, r, split.micro_batch, grad_accum=split.grad_accum) for r in range(world)]
    steps: list[list[int]] = []
    for ld in ranks:
        if state is not None:
            ld.load_state_dict(state)
        for mb in ld:
            index = ld.step - mb.last - (state["step"] if state else 0)  # (the step count moves on at a step's last micro-batch)
            steps.extend([] for _ in range(index + 1 - len(steps)))
            steps[index] += mb.batch[0].tolist()
            if mb.last and ld.step == until:
                break
    return [sorted(s) for s in steps], ranks[0].state_dict()  # type: ignore[return-value]


@pytest.mark.parametrize("n", [1024, 1000])  # 1000: a short last step of 40
def test_every_world_size_trains_the_same_samples_in_each_step(n):
    one, _ = _steps(n, 1)
    for world in (2, 4, 8):
        assert _steps(n, world)[0] == one
    assert [len(s) for s in one] == [64] * (n // 64) + ([n % 64] if n % 64 else [])


def test_a_resume_on_another_world_size_trains_the_steps_the_run_would_have():
    one, _ = _steps(1024, 1)
    _, saved = _steps(1024, 2, until=5)  # 2 ranks stop after step 5
    assert saved["step"] == 5 and saved["epoch_samples"] == 5 * 32 and saved["global_batch"] == 64
    rest, after = _steps(1024, 1, state=saved)  # ... and 1 rank trains on
    assert rest == one[5:]
    assert after["splits"] == [
        {"step": 0, "world_size": 2, "micro_batch": 16, "grad_accum": 2},
        {"step": 5, "world_size": 1, "micro_batch": 16, "grad_accum": 4},
    ]


def _changes(saved: dict, loader, config: dict | None = None, now: dict | None = None) -> list[str]:
    return [what for what, _ in trajectory_changes(saved, config or {}, loader, now or {})]


def test_what_leaves_the_trajectory_is_named_with_its_fix():
    two = loader(1000, 2, 0, 16, grad_accum=2).state_dict()
    assert _changes(two, loader(1000, 1, 0, 16, grad_accum=4)) == []  # the same global batch
    (what, fix), *_ = trajectory_changes(two, {}, loader(1000, 1, 0, 16, grad_accum=2), {})
    assert what == (
        "the global batch changes from 64 to 32 samples per optimizer step (16 x 2 micro-batches x 1 process now), so every "
        "later step trains on other samples and an epoch takes another number of steps"
    )
    assert fix == "keep --train.global_batch_size 64 (distrib splits it over any number of processes)"
    assert _changes(two, loader(999, 1, 0, 16, grad_accum=4)) == ["the training set changes from 1000 to 999 samples"]
    three = loader(999, 3, 0, 16, grad_accum=1).state_dict()
    assert _changes(three, loader(999, 1, 0, 48)) == []  # 999 = 3 x 333: no padding either way
    [(what, fix)] = trajectory_changes(loader(1000, 1, 0, 48).state_dict(), {}, loader(1000, 3, 0, 16), {})
    assert what == "the training set's 1000 samples do not split evenly over 3 processes (each epoch's last step repeats 2 of them)"
    assert fix == "a training set size that both 1 and 3 processes divide (a multiple of 3)"
    # Keys that reorder the samples.
    assert _changes(two, loader(1000, 2, 0, 16, grad_accum=2), {"seed": 0}, {"seed": 1}) == [
        "seed changes from 0 to 1, so later epochs read other samples in each step"
    ]


def test_drop_last_that_drops_another_share_at_the_new_world_size_is_named():
    # 560 samples, 64 a step: 1 process keeps 35 micro-batches of 16 (560); 4 keep 8 each (512), dropping 12 a rank.
    one = loader(560, 1, 0, 16, grad_accum=4, drop_last=True).state_dict()
    assert _changes(one, loader(560, 4, 0, 16, grad_accum=1, drop_last=True)) == [
        "data.drop_last drops each rank's partial last micro-batch: an epoch trains 560 samples on 1 process and 512 on 4"
    ]
    assert _changes(one, loader(560, 2, 0, 16, grad_accum=2, drop_last=True))[0].endswith("560 samples on 1 process and 544 on 2")
    # 512 samples: every world size keeps them all.
    assert _changes(loader(512, 1, 0, 16, grad_accum=4, drop_last=True).state_dict(), loader(512, 4, 0, 16, drop_last=True)) == []


def test_old_checkpoints_and_streams_without_a_length_are_judged_by_what_they_recorded():
    # A checkpoint from before the loader kept its global batch: at the same world size nothing is judged
    # (a script may have passed batch_size= to train_loader); at another, its config says the batch.
    old = {"epoch": 0, "epoch_samples": 0, "step": 3, "samples_seen": 192, "world_size": 2}
    assert _changes(old, loader(1000, 2, 0, 16), {"train": {"batch_size": 32, "grad_accum": 1}}) == []
    assert _changes(old, loader(1000, 1, 0, 64), {"train": {"batch_size": 32, "grad_accum": 1}}) == []
    assert _changes(old, loader(1000, 1, 0, 32), {"train": {"batch_size": 32, "grad_accum": 1}})[0].startswith("the global batch changes from 64 to 32")


def test_a_stream_without_a_length_has_no_training_set_size_to_compare():
    # Its epoch is train.max_steps x the global batch: raising max_steps to train on is not another training set.
    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(10**9))

    short, longer = (
        TrainLoader(Endless(), world_size=1, rank=0, seed=0, shuffle=False, drop_last=False, opts=LoaderOptions(batch_size=8), max_steps=m) for m in (5, 9)
    )
    assert short.dataset_size is None and _changes(short.state_dict(), longer) == []
