"""A run's trackers (wandb, TensorBoard, MLflow, CSV, your own) in a process of their own.

Run as a script (`process.py` starts it): it imports the trackers' packages, never distrib or torch,
and the training process never waits for it, never shares its interpreter lock with the trackers'
threads, and can end it if a tracker hangs. Each tracker runs on a thread of its own here, fed by
its own queue, so one that hangs (a server that never answers) holds up none of the others.

Reads JSON lines on stdin: first the run (`TrackerRun`'s fields, the trackers to start, the finish
budget), then `["log", record]` for each metrics.jsonl record, `["summary", summary]` for
summary.json, and `["end", outcome]`. A tracker's failure, at start or at any call, is one warning
on stderr, and that tracker is off for the rest of the run.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import queue
import sys
import threading
import time
from typing import Any

BUILTIN = {
    "wandb": "wandb_tracker:WandbTracker",
    "tensorboard": "tensorboard_tracker:TensorBoardTracker",
    "mlflow": "mlflow_tracker:MlflowTracker",
    "csv": "csv_tracker:CsvTracker",
}
"""`run.report_to`'s names, and the class in this folder each one starts (a user's own is given as `module:Class`)."""

START_GRACE_S = 5.0
"""How long the end of training waits for a tracker still starting (a hung wandb.init, an MLflow server that never answers)."""


@dataclasses.dataclass(frozen=True)
class TrackerRun:
    """What a tracker's `start` gets: the run it reports."""

    dir: str
    """run.dir, absolute: where a local tracker writes (TensorBoard's `tensorboard/`, MLflow's `mlruns/`, `metrics.csv`)."""
    id: str
    """distrib's id of the run: the same across resumes and requeues (it is kept in each checkpoint)."""
    config: dict[str, Any]
    """The run's whole config (config.json): the hyperparameters."""
    resumed_step: int | None = None
    """The step of the checkpoint this attempt resumed from; None for a fresh run. Records after it may come again."""
    kept_records: int | None = None
    """On resume, how many records of metrics.jsonl the checkpoint kept (the rest are logged again); None if unknown."""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Settings of the built-in trackers (wandb's init arguments)."""


def _warn(name: str, message: str) -> None:
    print(f"{name}: {message}", file=sys.stderr, flush=True)


def load(spec: str) -> Any:
    """The class a `module:Class` spec names."""
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Runner(threading.Thread):
    """One tracker on a thread of its own: starts it, then feeds it what comes on its queue."""

    def __init__(self, name: str, run: TrackerRun) -> None:
        super().__init__(name=f"tracker-{name}", daemon=True)
        self.tracker_name, self.run_info = name, run
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.started = threading.Event()

    def run(self) -> None:
        name, tracker = self.tracker_name, None
        try:
            tracker = load(BUILTIN.get(name, name))()
            if hasattr(tracker, "start"):
                tracker.start(self.run_info)
        except Exception as exc:  # noqa: BLE001 - no network, a bad key, a broken install: training goes on
            _warn(name, f"could not start ({type(exc).__name__}: {str(exc)[:300]}); training continues without it")
            tracker = None
        finally:
            self.started.set()
        summary: Any = None
        while True:
            kind, payload = self.queue.get()
            if kind == "end":
                break
            if tracker is None:
                continue
            if kind == "summary":
                summary = payload
                continue
            try:
                tracker.log(payload)
            except Exception as exc:  # noqa: BLE001
                _warn(name, f"log failed ({type(exc).__name__}: {str(exc)[:300]}); continuing without it")
                tracker = None
        if tracker is not None and hasattr(tracker, "finish"):
            try:
                tracker.finish(summary, payload)
            except Exception as exc:  # noqa: BLE001
                _warn(name, f"finish failed ({type(exc).__name__}: {str(exc)[:300]})")


def lowest_priority() -> None:
    """The lowest CPU priority there is, for this process and the services it starts (wandb's; they inherit it).

    Linux's idle policy (SCHED_IDLE): a rank that wakes (its all-reduce done, its batch ready)
    preempts this process at once; elsewhere nice 19. It only counts against processes of the same
    scheduling group, hence the rank's session (process.py). It does not make tracking free: at 2 ranks
    on 2 cores, CPU used beside the ranks still costs them time (BENCHMARKS.md), so the CPU itself is
    kept small.
    """
    if hasattr(os, "nice"):
        os.nice(19)
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # a container that forbids it: nice 19 stays
            pass


def _announce_started(runners: list[Runner], fd: int) -> None:
    """Tell the training process, through `fd`, once every tracker's start is over (tests wait on it)."""
    for runner in runners:
        runner.started.wait()
    os.write(fd, b"1")
    os.close(fd)


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    """A thread a tracker started itself (an event writer, an uploader) that fails: one line, not a traceback."""
    name = args.thread.name if args.thread is not None else "?"
    print(f"trackers: a background thread ({name}) failed: {args.exc_type.__name__}: {str(args.exc_value)[:300]}", file=sys.stderr, flush=True)


def main() -> int:
    lowest_priority()
    threading.excepthook = _thread_failed
    lines = iter(sys.stdin)
    init = json.loads(next(lines))
    # The training process's import path: a user's tracker (`mypkg.trackers:Mine`) imports as it would there.
    sys.path.extend(p for p in init.get("sys_path", []) if p not in sys.path)
    run = TrackerRun(**init["run"])
    runners = [Runner(name, run) for name in init["trackers"]]
    for runner in runners:
        runner.start()
    if len(sys.argv) > 1:
        threading.Thread(target=_announce_started, args=(runners, int(sys.argv[1])), daemon=True).start()
    outcome = "failed"  # end of input without an end: the training process died
    for line in lines:
        kind, payload = json.loads(line)
        if kind == "end":
            # Not EOF: DataLoader workers forked after this process started hold the pipe's write end for a while.
            outcome = payload
            break
        for i, runner in enumerate(runners):  # each tracker its own copy: one that edits a record changes no other's
            runner.queue.put((kind, payload if i == 0 else json.loads(line)[1]))
    budget = float(init.get("finish_timeout_s", 30.0))
    ended, grace = time.monotonic(), min(START_GRACE_S, budget)
    for runner in runners:
        runner.queue.put(("end", outcome))
    whole = True
    for runner in runners:
        if not runner.started.wait(max(0.0, ended + grace - time.monotonic())):
            _warn(runner.tracker_name, f"had not started {grace:g} s after training ended (it hangs?); ending it")
            whole = False
            continue
        runner.join(max(0.0, ended + budget - time.monotonic()))
        if runner.is_alive():
            _warn(runner.tracker_name, "did not flush in time; ending it. Training is done and metrics.jsonl is whole; its record of the run may be incomplete")
            whole = False
    return 0 if whole else 3


if __name__ == "__main__":
    code = main()
    # The training process waits for this one to end. Once the trackers have flushed, nothing is left
    # to write, yet the interpreter's own exit (unloading their modules) takes another ~0.3 s: skip it.
    # A tracker still hung is abandoned: exit 3 tells the training process to end what it started.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # the console is gone (the launcher died): nothing to flush to
            pass
    os._exit(code)
