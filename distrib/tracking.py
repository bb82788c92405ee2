"""Weights & Biases on rank 0, and nothing that can take the training job down with it.

`wandb.mode=auto` goes online only when credentials are configured (so a batch job never meets
an interactive login prompt) and offline otherwise, into `<run.dir>/wandb`. The run id comes from
the checkpoint on resume, so a resumed or requeued job keeps logging into the same run. Any
exception from wandb, at init or at log time, becomes one warning and wandb is switched off for
the rest of the run.
"""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

from distrib.config import WandbConfig
from distrib.logs import log


def has_credentials(env: Mapping[str, str] = os.environ) -> bool:
    """WANDB_API_KEY, or an api.wandb.ai (or WANDB_BASE_URL host) entry in the netrc file."""
    if env.get("WANDB_API_KEY"):
        return True
    host = env.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    path = env.get("NETRC") or str(Path(env.get("HOME", "~")).expanduser() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str, env: Mapping[str, str] = os.environ) -> str:
    if mode == "auto":
        return "online" if has_credentials(env) else "offline"
    if mode == "online" and not has_credentials(env):
        log.warning("wandb.mode=online but no credentials are configured (WANDB_API_KEY or `wandb login`): logging offline instead of prompting")
        return "offline"
    return mode


class Tracker:
    """What the trainer calls; this base class does nothing (other ranks, wandb disabled or failed)."""

    run_id: str | None = None

    def log(self, record: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, run: Any) -> None:
        self._run = run
        self.run_id = run.id

    def log(self, record: dict[str, Any]) -> None:
        if self._run is None:
            return
        kind = record.get("kind", "train")
        values = {f"{kind}/{k}": v for k, v in record.items() if k not in ("kind", "step") and isinstance(v, (int, float))}
        try:
            self._run.log(values, step=int(record["step"]))
        except Exception as exc:  # noqa: BLE001 - wandb must never stop training
            log.warning(f"wandb: log failed ({exc!r}); continuing without wandb")
            self._run = None

    def finish(self) -> None:
        if self._run is None:
            return
        try:
            self._run.finish()
        except Exception as exc:  # noqa: BLE001
            log.warning(f"wandb: finish failed ({exc!r})")
        self._run = None


def start(cfg: WandbConfig, *, run_dir: str, config: dict[str, Any], run_id: str | None, env: Mapping[str, str] = os.environ) -> Tracker:
    """Rank 0's tracker: a wandb run (resumed when `run_id` is given), or a null one if wandb is off or fails."""
    mode = resolve_mode(cfg.mode, env)
    if mode == "disabled":
        return Tracker()
    try:
        import wandb

        run_id = run_id or secrets.token_hex(4)  # wandb ids: lowercase letters and digits
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            mode=mode,
            dir=run_dir,
            id=run_id,
            resume="allow",
            project=cfg.project,
            name=cfg.name,
            tags=cfg.tags or None,
            group=cfg.group or env.get("SLURM_JOB_ID"),
            config=config,
            settings=wandb.Settings(console="off", silent=True, init_timeout=cfg.init_timeout_s, x_disable_stats=True),
        )
    except Exception as exc:  # noqa: BLE001 - no network, a bad key, a broken install: train on
        log.warning(f"wandb: could not start a run ({type(exc).__name__}: {str(exc)[:300]}); training continues without wandb")
        return Tracker()
    where = Path(run.dir).parent  # run.dir is the run's files/ folder
    log.info(f"wandb: {mode} run {run.id}" + (f" in {where} (upload later: wandb sync {where})" if mode == "offline" else ""))
    return WandbTracker(run)
