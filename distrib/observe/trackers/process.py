"""Weights & Biases on rank 0, and nothing that can take the training job down with it, or slow it.

`wandb.mode=auto` goes online only when credentials are configured (so a batch job never meets
an interactive login prompt) and offline otherwise, into `<run.dir>/wandb`. Keys left unset defer
to wandb's environment conventions (WANDB_MODE, WANDB_DISABLED, WANDB_PROJECT, WANDB_DIR, ...).
The run id comes from the checkpoint on resume, so a resumed or requeued job keeps logging into the
same run. wandb runs in a process of its own: the first step never waits for it, records logged
before it is up are queued and sent in order. Any exception from wandb, at init or at log time,
becomes one warning and wandb is switched off for the rest of the run; a wandb that still hangs
when training ends is ended after a bounded wait.
"""

from __future__ import annotations

import json
import netrc
import os
import queue
import secrets
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distrib.config import WandbConfig
from distrib.runtime.console import log


def base_url(env: Mapping[str, str] = os.environ) -> str:
    """The server wandb will talk to: WANDB_BASE_URL, else `base_url` in wandb's settings file (`wandb login --host`)."""
    if env.get("WANDB_BASE_URL"):
        return env["WANDB_BASE_URL"]
    import configparser

    config_dir = env.get("WANDB_CONFIG_DIR") or str(Path(env.get("HOME", "~")).expanduser() / ".config" / "wandb")
    settings = configparser.ConfigParser()
    try:
        settings.read(Path(config_dir) / "settings")
        return settings.get("default", "base_url", fallback="https://api.wandb.ai")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return "https://api.wandb.ai"


def has_credentials(env: Mapping[str, str] = os.environ) -> bool:
    """WANDB_API_KEY, or a netrc entry for the host wandb is configured to use (`base_url`)."""
    if env.get("WANDB_API_KEY"):
        return True
    host = base_url(env).split("://")[-1].split("/")[0].split(":")[0]
    path = env.get("NETRC") or str(Path(env.get("HOME", "~")).expanduser() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def resolve_mode(mode: str | None, env: Mapping[str, str] = os.environ) -> str:
    """distrib's key if set, else wandb's environment (WANDB_MODE, WANDB_DISABLED), else `auto`; then `auto` decides."""
    if mode is None:
        if env.get("WANDB_MODE", "").lower() in _ENV_MODES:
            mode = _ENV_MODES[env["WANDB_MODE"].lower()]
        elif env.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes", "on"):
            mode = "disabled"
        else:
            mode = "auto"
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


class ProcessTracker(Tracker):
    """A wandb run in its own process (`wandb_worker.py`), fed through a pipe by a thread of ours.

    `log` only enqueues, so no step waits, not even while wandb.init is still connecting; records
    are sent in order once the process reads them. `finish` closes the pipe and waits a bounded
    time for the run to flush; a run that hangs is ended, which costs its wandb history, not the job.
    """

    def __init__(self, init_args: dict[str, Any], *, run_id: str, finish_timeout_s: float) -> None:
        self.run_id = run_id
        self._finish_timeout_s = finish_timeout_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Run as a script, not `-m distrib...`: importing the package would import torch for nothing.
        self._started, started_w = os.pipe()  # the worker writes a byte here once wandb.init is over
        try:
            self._proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("wandb_worker.py")), str(started_w)],
                stdin=subprocess.PIPE,
                text=True,
                pass_fds=(started_w,),
                **_OWN_GROUP,
            )
        finally:
            os.close(started_w)
        self._queue.put(init_args)
        self._feeder = threading.Thread(target=self._feed, name="distrib-wandb", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        assert self._proc.stdin is not None
        try:
            while (item := self._queue.get()) is not _FINISH:
                self._proc.stdin.write(json.dumps(item, default=str) + "\n")
                self._proc.stdin.flush()
            # An explicit end, not just EOF: DataLoader workers forked after this process started
            # hold a copy of the pipe's write end, so EOF can come long after the run ended.
            self._proc.stdin.write(json.dumps("end") + "\n")
            self._proc.stdin.close()
        except (OSError, ValueError):  # the process is gone: nothing more to send
            pass

    def log(self, record: dict[str, Any]) -> None:
        self._queue.put(record)

    def finish(self) -> None:
        """Flush and close the run: up to 30 s once wandb is up, 5 s for a wandb.init still under way at the end."""
        self._queue.put(_FINISH)
        started = bool(select.select([self._started], [], [], _START_GRACE_S)[0])
        os.close(self._started)
        try:
            self._proc.wait(self._finish_timeout_s if started else 0.1)
        except subprocess.TimeoutExpired:
            why = "did not flush in time" if started else f"had not started {_START_GRACE_S:g} s after training ended (wandb.init hangs?)"
            log.warning(f"wandb: the run {why}; ending it. Training is done and metrics.jsonl is whole; the wandb run may be incomplete")
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()


_FINISH = object()
_START_GRACE_S = 5.0
# A process group of its own (a terminal's Ctrl-C must not kill the run before it flushes, and a hung
# run is ended with its group), but not a session of its own: on Linux a new session is a new
# scheduling group (autogroup), which gets a fair share of the CPU against the ranks whatever its
# priority. In the rank's group, the worker's idle priority (wandb_worker.py) is what counts.
_OWN_GROUP: dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def start(cfg: WandbConfig, *, run_dir: str, config: dict[str, Any], run_id: str | None, env: Mapping[str, str] = os.environ) -> Tracker:
    """Rank 0's tracker: a wandb run (resumed when `run_id` is given) in its own process, or a null one if wandb is off."""
    mode = resolve_mode(cfg.mode, env)
    if mode == "disabled":
        return Tracker()  # and wandb is never started
    run_id = run_id or secrets.token_hex(4)  # wandb ids: lowercase letters and digits
    init_args = {
        "mode": mode,
        "dir": env.get("WANDB_DIR") or run_dir,
        "id": run_id,
        "project": cfg.project or env.get("WANDB_PROJECT") or "distrib",
        "name": cfg.name,
        "tags": cfg.tags or None,
        "group": cfg.group or env.get("WANDB_RUN_GROUP") or env.get("SLURM_JOB_ID"),
        "config": config,
        "init_timeout": cfg.init_timeout_s,
    }
    try:
        return ProcessTracker(init_args, run_id=run_id, finish_timeout_s=30.0)
    except OSError as exc:
        log.warning(f"wandb: could not start its process ({exc}); training continues without wandb")
        return Tracker()
