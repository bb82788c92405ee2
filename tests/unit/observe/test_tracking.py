"""wandb follows its users' environment conventions, and can neither slow nor stop the job (the real
package, in its own process, against a wandb server on loopback that accepts and never answers)."""

from __future__ import annotations

import pytest

from distrib.observe.trackers.process import resolve_mode


@pytest.mark.parametrize(
    "mode, env, expected",
    [
        (None, {"WANDB_MODE": "disabled"}, "disabled"),
        (None, {"WANDB_DISABLED": "true"}, "disabled"),
        (None, {"WANDB_MODE": "dryrun"}, "offline"),
        (None, {}, "offline"),  # auto without credentials: offline, never a login prompt
        (None, {"WANDB_MODE": "offline", "WANDB_DISABLED": "true"}, "offline"),  # WANDB_MODE is the more specific
        ("offline", {"WANDB_MODE": "disabled"}, "offline"),  # distrib's key, set explicitly, wins
        ("disabled", {"WANDB_MODE": "online", "WANDB_API_KEY": "k" * 40}, "disabled"),
    ],
)
def test_the_mode_comes_from_distribs_key_then_wandbs_environment(tmp_path, mode, env, expected):
    assert resolve_mode(mode, {"HOME": str(tmp_path), **env}) == expected
