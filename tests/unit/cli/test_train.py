"""End to end: `python -m distrib.train` and real `torchrun --nproc_per_node=2` on gloo."""

from __future__ import annotations

import torch

from distrib.cli.task import TaskConfig, make_model
from distrib.parallel.wrap import params_sha256


def test_params_sha256_tells_bitwise_equal_from_different():
    a, b = make_model(TaskConfig(), seed=0), make_model(TaskConfig(), seed=0)
    assert params_sha256(a) == params_sha256(b)
    with torch.no_grad():
        b[0].weight[0, 0] = torch.nextafter(b[0].weight[0, 0], torch.tensor(1.0))
    assert params_sha256(a) != params_sha256(b)
