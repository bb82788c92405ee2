"""Moving nested batches to a device; errors for batches that are not tensor structures."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch

from distrib.data.transfer import CudaPrefetcher, describe, leading_dim, to_device
from distrib.errors import BatchError

Pair = namedtuple("Pair", "x y")


@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    meta: dict
    name: str = "a"


def nested() -> dict:
    return {"pair": Pair(torch.ones(4, 2), [torch.zeros(4), (torch.arange(4), 7)]), "sample": Sample(torch.ones(4, 3), {"m": torch.ones(4)})}


def test_every_tensor_moves_and_structure_is_kept():
    out = to_device(nested(), torch.device("meta"))
    assert isinstance(out["pair"], Pair) and isinstance(out["sample"], Sample)
    assert out["pair"].x.device.type == "meta" and out["pair"].y[0].device.type == "meta"
    assert out["pair"].y[1][0].device.type == "meta" and out["pair"].y[1][1] == 7
    assert out["sample"].image.device.type == "meta" and out["sample"].meta["m"].device.type == "meta"
    assert out["sample"].name == "a"


def test_leading_dim_and_describe():
    assert leading_dim(nested()) == 4
    text = describe(nested())
    assert (
        "batch['pair'].x: float32[4, 2] on cpu" in text and "batch['pair'].y[1][0]: int64[4] on cpu" in text and "batch['sample'].image: float32[4, 3]" in text
    )


def test_non_tensor_leaf_is_named():
    class Image:
        pass

    with pytest.raises(BatchError, match=r"batch\[1\]\['img'\] is a .*Image, not a tensor"):
        to_device((torch.ones(1), {"img": Image()}), torch.device("cpu"))


def test_batch_without_tensors():
    with pytest.raises(BatchError, match="holds no tensor"):
        to_device(["a", 1], torch.device("cpu"))


@pytest.mark.gpu
def test_prefetcher_delivers_the_same_batches_on_cuda():
    dev = torch.device("cuda", 0)
    batches = [(torch.randn(64, 8).pin_memory(), torch.arange(64).pin_memory()) for _ in range(6)]
    got = list(CudaPrefetcher(batches, dev))
    assert len(got) == 6
    for (x, y), (gx, gy) in zip(batches, got):
        assert gx.device == dev and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
