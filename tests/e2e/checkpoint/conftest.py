"""Fixtures the e2e checkpoint tests share with their unit halves."""

from tests.unit.checkpoint.test_rundir import finished  # noqa: F401 (a fixture: pytest finds it here by name)
