"""Rank 0's trackers (`run.report_to`), in a process of their own, and nothing that can take the job down with them, or slow it.

The trackers run in `worker.py`'s process, started at the first metrics line: the first step never
waits for them, records logged before they are up are queued and sent in order. Any exception from
a tracker, at start or at log time, becomes one warning and that tracker is off for the rest of the
run; at the end, the trackers get `run.tracker_timeout_s` to flush (5 s for one still starting),
then their process is ended. `check` refuses, before anything is written, a tracker that is not
installed or a user's `module:Class` that does not import.

wandb's `mode=auto` goes online only when credentials are configured (so a batch job never meets an
interactive login prompt) and offline otherwise, into `<run.dir>/wandb`. Keys left unset defer to
wandb's environment conventions (WANDB_MODE, WANDB_DISABLED, WANDB_PROJECT, WANDB_DIR, ...).
The run id comes from the checkpoint on resume, so a resumed or requeued job logs into the same run
(each tracker's own: wandb's id, MLflow's tagged run, TensorBoard's step axis, the CSV's rows).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import netrc
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distrib.config import Config, WandbConfig
from distrib.errors import ConfigError
from distrib.observe.trackers.worker import BUILTIN, TrackerRun, load
from distrib.runtime.console import log

PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow"}
"""The package each built-in tracker imports (installed with distrib's extra of the same name; csv needs none)."""


def check(cfg: Config) -> None:
    """ConfigError (exit 2) for a tracker that cannot start here: a package not installed, a `module:Class` that does not import.

    wandb, when disabled (wandb.mode, WANDB_MODE or WANDB_DISABLED), needs no package: it is never started.
    """
    wandb_off = cfg.wandb.mode == "disabled" or (cfg.wandb.mode is None and resolve_mode(None) == "disabled")
    for name in cfg.run.report_to:
        if name == "wandb" and wandb_off:
            continue
        if name in PACKAGES:
            if importlib.util.find_spec(PACKAGES[name]) is None:
                raise ConfigError(
                    f"run.report_to includes {name!r}, but the {PACKAGES[name]} package is not installed. "
                    f"HINT: pip install 'distrib[{name}]' (or pip install {PACKAGES[name]}), or drop {name} from --run.report_to."
                )
        elif name not in BUILTIN and name != "none":
            try:
                obj = load(name)  # as the trackers' process will
            except Exception as exc:  # noqa: BLE001 - any failure to import the user's module is the user's to fix
                raise ConfigError(
                    f"run.report_to: the tracker {name!r} does not import ({type(exc).__name__}: {exc}). "
                    "HINT: a module on the Python path and a class in it, as module:Class (docs/trackers.md)."
                ) from None
            if not callable(getattr(obj, "log", None)):
                raise ConfigError(
                    f"run.report_to: {name} has no log(record) method. HINT: a tracker class has log, and may have start and finish (docs/trackers.md)."
                )


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


def wandb_args(cfg: WandbConfig, *, run_dir: str, config: dict[str, Any], run_id: str, env: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """wandb.init's arguments, or None when wandb is disabled (then it is never started)."""
    mode = resolve_mode(cfg.mode, env)
    if mode == "disabled":
        return None
    return {
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


class Tracker:
    """What the run's writer calls; this base class does nothing (other ranks, `run.report_to none`)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def summary(self, summary: dict[str, Any]) -> None:
        pass

    def finish(self, outcome: str = "finished") -> None:
        pass


class ProcessTracker(Tracker):
    """The trackers in their own process (`worker.py`), fed through a pipe by a thread of ours.

    `log` only enqueues, so no step waits, not even while a tracker is still connecting; records
    are sent in order once the process reads them. `finish` sends the end and waits a bounded time
    for the trackers to flush; a process that outlives that is ended, which costs a tracker's
    record of the run, never the job.
    """

    def __init__(self, init: dict[str, Any], *, finish_timeout_s: float) -> None:
        self._finish_timeout_s = finish_timeout_s
        self._warned = False
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Run as a script, not `-m distrib...`: importing the package would import torch for nothing.
        self._started, started_w = os.pipe()  # the worker writes a byte here once every tracker's start is over
        try:
            self._proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("worker.py")), str(started_w)],
                stdin=subprocess.PIPE,
                text=True,
                pass_fds=(started_w,),
                **_OWN_GROUP,
            )
        finally:
            os.close(started_w)
        self._queue.put(init)
        self._feeder = threading.Thread(target=self._feed, name="distrib-trackers", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        assert self._proc.stdin is not None
        try:
            while True:
                item = self._queue.get()
                self._proc.stdin.write(json.dumps(item, default=str) + "\n")
                self._proc.stdin.flush()
                if isinstance(item, list) and item[0] == "end":
                    break
            self._proc.stdin.close()
        except (OSError, ValueError):  # the process is gone (a tracker crashed it): nothing more to send
            self._died()

    def _died(self) -> None:
        if self._warned:
            return
        self._warned = True
        code = self._proc.wait()
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        log.warning(f"trackers: their process ended during the run ({how}: a tracker crashed it); training goes on, metrics.jsonl is whole")

    def log(self, record: dict[str, Any]) -> None:
        self._queue.put(["log", record])

    def summary(self, summary: dict[str, Any]) -> None:
        self._queue.put(["summary", summary])

    def finish(self, outcome: str = "finished") -> None:
        """Send the end; wait for the trackers to flush (the worker bounds each), then a little more, then end them."""
        self._queue.put(["end", outcome])
        try:
            self._proc.wait(self._finish_timeout_s + 10.0)
        except subprocess.TimeoutExpired:
            log.warning("trackers: their process did not end in time; ending it. Training is done and metrics.jsonl is whole")
        finally:
            os.close(self._started)
        if self._proc.returncode not in (0, 3, None):
            self._died()  # it died before the end (and wrote nothing more)
        if self._proc.returncode != 0:  # a tracker still hung (the worker said so), or the worker itself: end what it started
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._proc.wait()


# A process group of its own (a terminal's Ctrl-C must not kill the trackers before they flush, and a hung
# one is ended with its group), but not a session of its own: on Linux a new session is a new
# scheduling group (autogroup), which gets a fair share of the CPU against the ranks whatever its
# priority. In the rank's group, the worker's idle priority (worker.py) is what counts.
_OWN_GROUP: dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def start(cfg: Config, *, run_id: str, resumed: tuple[int | None, int] | None = None, env: Mapping[str, str] = os.environ) -> Tracker:
    """Rank 0's trackers (`run.report_to`) in their own process, or a null tracker when none is on.

    `resumed`: (metrics.jsonl lines kept, step) of the checkpoint a resume restored.
    """
    names = [n for n in cfg.run.report_to if n != "none"]
    config = cfg.to_dict()
    run_dir = str(Path(cfg.run.dir).absolute())
    options: dict[str, Any] = {}
    if "wandb" in names:
        args = wandb_args(cfg.wandb, run_dir=run_dir, config=config, run_id=run_id, env=env)
        if args is None:
            names.remove("wandb")  # disabled: never started
        else:
            options["wandb"] = args
    if not names:
        return Tracker()
    kept, step = resumed if resumed is not None else (None, None)
    run = TrackerRun(dir=run_dir, id=run_id, config=config, resumed_step=step, kept_records=kept, options=options)
    init = {
        "trackers": names,
        "run": dataclasses.asdict(run),
        "sys_path": [os.path.abspath(p) for p in sys.path],
        "finish_timeout_s": cfg.run.tracker_timeout_s,
    }
    try:
        return ProcessTracker(init, finish_timeout_s=cfg.run.tracker_timeout_s)
    except OSError as exc:
        log.warning(f"trackers: could not start their process ({exc}); training continues without {', '.join(names)}")
        return Tracker()
