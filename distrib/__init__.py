"""distrib: distributed data-parallel training for PyTorch, one loop for python, torchrun and srun."""

from distrib.config import Config, parse_config
from distrib.dist import Runtime, all_gather_object, all_reduce_sum, barrier, broadcast_object, distributed
from distrib.env import DistEnv, detect
from distrib.errors import BatchError, ConfigError, DistribError, EnvironmentConfigError, PeerError
from distrib.loop import Trainer
from distrib.model import params_sha256, unwrap_model, wrap_model
from distrib.run import fit
from distrib.stop import EXIT_STOPPED, StopRequest
from distrib.transfer import to_device

__all__ = [
    "BatchError",
    "Config",
    "ConfigError",
    "DistEnv",
    "DistribError",
    "EXIT_STOPPED",
    "EnvironmentConfigError",
    "PeerError",
    "Runtime",
    "StopRequest",
    "Trainer",
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "detect",
    "distributed",
    "fit",
    "params_sha256",
    "parse_config",
    "to_device",
    "unwrap_model",
    "wrap_model",
]
