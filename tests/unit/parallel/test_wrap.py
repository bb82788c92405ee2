"""Model wrapping on real gloo ranks: DDP options, SyncBatchNorm, unwrap; precision and clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrib import distributed
from distrib.config import DistConfig
from distrib.errors import ConfigError
from distrib.parallel.precision import Precision
from distrib.parallel.wrap import wrap_model


def test_syncbn_on_cpu_is_explained():
    with distributed(device="cpu") as rt:
        with pytest.raises(ConfigError, match="SyncBatchNorm works only on CUDA.*--dist.sync_batchnorm false"):
            wrap_model(nn.BatchNorm1d(2), rt, DistConfig(sync_batchnorm=True))


def test_no_wrapper_in_one_process():
    with distributed(device="cpu") as rt:
        model = nn.Linear(2, 2)
        assert wrap_model(model, rt, DistConfig(find_unused_parameters=True)) is model


def test_fp16_uses_a_grad_scaler_and_fp32_does_not():
    assert Precision("fp16", torch.device("cpu")).scaler.is_enabled()
    assert not Precision("fp32", torch.device("cpu")).scaler.is_enabled()
    with pytest.raises(ConfigError, match="train.precision='fp8' is unknown"):
        Precision("fp8", torch.device("cpu"))
