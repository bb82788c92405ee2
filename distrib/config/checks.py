"""The checks each config section runs on its values: each failure a ConfigError naming the key and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from distrib.errors import ConfigError

TRACKERS = ("wandb", "tensorboard", "mlflow", "csv", "none")
"""run.report_to's names (a user's own tracker is `module:Class`)."""


def positive(section: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            fix = "1 or larger" if isinstance(value, int) else "a value above 0 (e.g. 0.1)"
            raise ConfigError(f"{section}.{name}={value} must be > 0. HINT: pass --{section}.{name} {fix}.")


def non_negative(section: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value < 0:
            raise ConfigError(f"{section}.{name}={value} must be >= 0. HINT: pass --{section}.{name} 0 or larger.")


def one_of(section: str, name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value).lower(), choices, n=1, cutoff=0.5)  # `FSDP` -> fsdp
        raise ConfigError(f"{section}.{name}={value!r} is not one of {', '.join(choices)}. HINT: pass --{section}.{name} {(near or choices)[0]}.")


def check_report_to(names: list[str]) -> None:
    """run.report_to: known trackers or `module:Class`, each once, or `none` alone."""
    fix = ",".join(n if n in TRACKERS or ":" in n else (difflib.get_close_matches(n.lower(), TRACKERS, n=1, cutoff=0.5) or ["none"])[0] for n in names)
    for name in names:
        if ":" in name:
            module, _, attr = name.partition(":")
            if not (all(p.isidentifier() for p in module.split(".")) and all(p.isidentifier() for p in attr.split("."))):
                raise ConfigError(f"run.report_to: {name!r} is not a tracker of your own as module:Class. HINT: e.g. --run.report_to mypkg.trackers:MyTracker.")
        elif name not in TRACKERS:
            raise ConfigError(f"run.report_to: {name!r} is not one of {', '.join(TRACKERS)} (or module:Class for your own). HINT: pass --run.report_to {fix}.")
    if not names:
        raise ConfigError("run.report_to is empty. HINT: pass --run.report_to none to report to metrics.jsonl only.")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"run.report_to={','.join(names)!r}: `none` goes alone. HINT: pass --run.report_to none, or the trackers you want.")
    if len(set(names)) < len(names):
        raise ConfigError(f"run.report_to names a tracker twice ({','.join(names)}). HINT: pass --run.report_to {','.join(dict.fromkeys(names))}.")
