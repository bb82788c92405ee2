"""The non-finite guard on real gloo ranks: a sample that is NaN on rank 1 at step 7 only.

Every rank decides alike without a collective of the guard's own (DDP: the reduced gradients are
the same everywhere; FSDP: the sharded gradients' norm is all-reduced), so `error` stops every rank
at step 7 and `skip` drops step 7 on every rank, with the result of one process on the same global batch.
"""

from __future__ import annotations

import pytest
import torch

from distrib import params_sha256
from distrib.checkpoint import store as ck
from distrib.errors import NonFiniteError
from tests.helpers import spawn
from tests.unit.loop.test_guard import run, saved_model  # the one-process halves of these runs


def _rank(rank: int, world: int, run_dir: str, mode: str, strategy: str) -> dict:
    """One rank of a run with the global batch of 8 that one process takes at once."""
    from pathlib import Path

    try:
        summary, model = run(Path(run_dir), mode, batch=8 // world, **{"dist.strategy": strategy})
    except NonFiniteError as error:
        return {"error": str(error), "exit_code": error.exit_code}
    plain = not any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP's shards need the group, gone now
    return {"summary": summary, "params": [p.detach().clone() for p in model.parameters()] if plain else None, "sha": params_sha256(model) if plain else None}


@pytest.mark.parametrize(
    "world, culprit",
    [
        (2, "rank 1's loss was the first not finite, at step 7 (epoch 0, dataset indices [49, 51, 53, 55])"),
        (4, "rank 3's loss was the first not finite, at step 7 (epoch 0, dataset indices [51, 55])"),
    ],
)
def test_error_stops_every_rank_at_step_7_naming_the_rank_and_its_samples(tmp_path, world, culprit):
    results = spawn(_rank, world, tmp_path, str(tmp_path), "error", "ddp")
    for r in results:
        assert r.get("exit_code") == 1, r
        assert "the gradients of optimizer step 7 are not finite" in r["error"]
        assert culprit in r["error"], r["error"]
    newest = ck.newest_good(tmp_path / "run" / "checkpoints")
    assert newest is not None and newest[0].name == "step-000000006"
    assert all(torch.isfinite(t).all() for t in saved_model(tmp_path / "run", 6).values())


@pytest.mark.parametrize("world", [2, 4])
def test_skip_drops_step_7_on_every_rank_as_one_process_does(tmp_path, world):
    two = spawn(_rank, world, tmp_path / "two", str(tmp_path / "two"), "skip", "ddp")
    assert [r["summary"]["skipped_steps"] for r in two] == [[7]] * world
    assert len({r["sha"] for r in two}) == 1  # the ranks still hold one model
    at6, at7 = saved_model(tmp_path / "two" / "run", 6), saved_model(tmp_path / "two" / "run", 7)
    assert all(torch.equal(at6[k], at7[k]) for k in at6)  # step 7 moved nothing
    one, _ = run(tmp_path / "one", "skip", batch=8)  # the same global batches in one process
    assert one["skipped_steps"] == [7] and one["optimizer_steps"] == two[0]["summary"]["optimizer_steps"] == 8
    _, model = run(tmp_path / "one-again", "skip", batch=8)
    for a, b in zip(two[0]["params"], model.parameters(), strict=True):
        assert torch.allclose(a, b.detach(), atol=1e-6)  # 2 ranks average in another order than 1: equal to rounding


def test_skip_under_fsdp_agrees_through_the_sharded_norm(tmp_path):
    fsdp = spawn(_rank, 2, tmp_path / "fsdp", str(tmp_path / "fsdp"), "skip", "fsdp")
    ddp = spawn(_rank, 2, tmp_path / "ddp", str(tmp_path / "ddp"), "skip", "ddp")
    assert [r["summary"]["skipped_steps"] for r in fsdp] == [[7], [7]] == [r["summary"]["skipped_steps"] for r in ddp]
    sharded = torch.load(tmp_path / "fsdp" / "run" / "model.pt", weights_only=True)  # the whole model, gathered at the end
    whole = torch.load(tmp_path / "ddp" / "run" / "model.pt", weights_only=True)
    for key in whole:
        assert torch.isfinite(sharded[key]).all() and torch.allclose(sharded[key], whole[key], atol=1e-6), key
