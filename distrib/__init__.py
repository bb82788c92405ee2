"""distrib: distributed data-parallel training for PyTorch, one loop for python, torchrun and srun.

Two ways to use one set of blocks: `fit(cfg, model=..., train_data=...)`, or your own loop on a
`Session` (`setup`, `train_loader`, `no_backward_sync`, `backward`, `step`, `save`/`load`, `log`).
"""

from distrib.callbacks import Callback, EarlyStopping
from distrib.argv import config_help, parse_config
from distrib.config import Config, OptimConfig, config_class
from distrib.data import EvalLoader, MicroBatch, TrainLoader
from distrib.dist import Runtime, all_gather_object, all_reduce_sum, barrier, broadcast_object, distributed
from distrib.env import DistEnv, detect
from distrib.errors import BatchError, ConfigError, DistribError, EnvironmentConfigError, PeerError
from distrib.loop import Trainer
from distrib.metrics import Metrics
from distrib.model import params_sha256, state_bytes, unwrap_model, wrap_model
from distrib.run import fit, main
from distrib.session import Session
from distrib.shutdown import quick_exit
from distrib.steps import label_tokens
from distrib.stop import EXIT_STOPPED, StopRequest
from distrib.transfer import to_device

__all__ = [
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
