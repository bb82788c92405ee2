"""distrib: distributed data-parallel training for PyTorch, one loop for python, torchrun and srun.

Two ways to use one set of blocks: `fit(cfg, model=..., train_data=...)`, or your own loop on a
`Session` (`setup`, `train_loader`, `no_backward_sync`, `backward`, `step`, `save`/`load`, `log`).
"""

from distrib.config import Config, OptimConfig, config_class, config_help, parse_config
from distrib.data.accumulate import MicroBatch
from distrib.data.loaders import EvalLoader, TrainLoader
from distrib.data.transfer import to_device
from distrib.errors import BatchError, ConfigError, DistribError, EnvironmentConfigError, PeerError
from distrib.loop.callbacks import Callback, EarlyStopping
from distrib.loop.fit import fit, main
from distrib.loop.loss import label_tokens
from distrib.loop.session import Session
from distrib.loop.trainer import Trainer
from distrib.observe.activations import ActivationBytes
from distrib.observe.metrics import Metrics
from distrib.parallel.wrap import params_sha256, state_bytes, unwrap_model, wrap_model
from distrib.runtime.collectives import all_gather_object, all_reduce_sum, barrier, broadcast_object
from distrib.runtime.env import DistEnv, detect
from distrib.runtime.group import Runtime, distributed
from distrib.runtime.shutdown import quick_exit
from distrib.runtime.stop import EXIT_STOPPED, StopRequest

__all__ = [
    "ActivationBytes",
    "BatchError",
    "Callback",
    "Config",
    "ConfigError",
    "DistEnv",
    "DistribError",
    "EXIT_STOPPED",
    "EarlyStopping",
    "EnvironmentConfigError",
    "EvalLoader",
    "Metrics",
    "MicroBatch",
    "OptimConfig",
    "PeerError",
    "Runtime",
    "Session",
    "StopRequest",
    "TrainLoader",
    "Trainer",
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "config_class",
    "config_help",
    "detect",
    "distributed",
    "fit",
    "label_tokens",
    "main",
    "params_sha256",
    "parse_config",
    "quick_exit",
    "state_bytes",
    "to_device",
    "unwrap_model",
    "wrap_model",
]
