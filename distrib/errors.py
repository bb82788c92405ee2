"""Error types users see. Every message says what was set, what was expected, and the fix."""

from __future__ import annotations


class DistribError(Exception):
    """Base class for errors raised by distrib."""


class ConfigError(DistribError, ValueError):
    """A config value, CLI flag or config file is invalid."""


class EnvironmentConfigError(DistribError, RuntimeError):
    """The launcher's environment variables are inconsistent."""


class BatchError(DistribError, TypeError):
    """A batch is not a structure of tensors that distrib can move and split."""
