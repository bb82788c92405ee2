"""The wandb run of a job, in a process of its own (run as a script: it imports wandb, not distrib or torch).

Reads JSON lines on stdin: the first holds `wandb.init`'s arguments, each later one a metrics
record; end of input finishes the run. The training process never waits for wandb, never shares
its interpreter lock with wandb's threads, and can end this process if wandb hangs.
Any wandb failure is one warning on stderr; the records that follow are read and dropped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def _warn(message: str) -> None:
    print(f"wandb: {message}", file=sys.stderr, flush=True)


def _start(args: dict[str, Any]) -> Any:
    import wandb

    _skip_launch_inputs(wandb)
    Path(args["dir"]).mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(console="off", silent=True, init_timeout=args.pop("init_timeout"), x_disable_stats=True)
    run = wandb.init(resume="allow", settings=settings, **args)
    where = Path(run.dir).parent  # run.dir is the run's files/ folder
    offline = args["mode"] == "offline"
    print(f"wandb: {args['mode']} run {run.id}" + (f" in {where} (upload later: wandb sync {where})" if offline else ""), flush=True)
    return run


def _skip_launch_inputs(wandb: Any) -> None:
    """Skip wandb.init's look for W&B Launch inputs, which imports Launch's agent and API (~0.2 s of CPU).

    The inputs it applies are those the script staged *in its own process* (`wandb.launch.manage_config_file`
    and the like): this process runs no user code, so there are none, and the look is pure cost on
    cores the ranks are using. A wandb without that method is left as it is.
    """
    run_class = getattr(getattr(getattr(wandb, "sdk", None), "wandb_run", None), "Run", None)
    if run_class is not None and hasattr(run_class, "_detect_and_apply_job_inputs"):
        run_class._detect_and_apply_job_inputs = lambda self: None


END = '"end"'
"""The line that ends the stream (distrib.observe.tracking sends it)."""


def lowest_priority() -> None:
    """The lowest CPU priority there is, for this process and the wandb service it starts (both inherit it).

    Linux's idle policy (SCHED_IDLE): a rank that wakes (its all-reduce done, its batch ready)
    preempts this process at once; elsewhere nice 19. It only counts against processes of the same
    scheduling group, hence the rank's session (tracking.py). It does not make wandb free: at 2 ranks
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


def main() -> int:
    lowest_priority()
    lines = iter(sys.stdin)
    run = None
    try:
        run = _start(json.loads(next(lines)))
    except Exception as exc:  # noqa: BLE001 - no network, a bad key, a broken install: training goes on
        _warn(f"could not start a run ({type(exc).__name__}: {str(exc)[:300]}); training continues without wandb")
    if len(sys.argv) > 1:  # tell the training process that init is over, so it knows what it may wait for
        os.write(int(sys.argv[1]), b"1")
        os.close(int(sys.argv[1]))
    for line in lines:
        if line.strip() == END:
            break  # not EOF: forked DataLoader workers may hold the pipe's write end open for a while
        if run is None:
            continue
        record = json.loads(line)
        kind = record.get("kind", "train")
        values = {f"{kind}/{k}": v for k, v in record.items() if k not in ("kind", "step") and isinstance(v, (int, float))}
        try:
            run.log(values, step=int(record["step"]))
        except Exception as exc:  # noqa: BLE001
            _warn(f"log failed ({exc!r}); continuing without wandb")
            run = None
    if run is not None:
        try:
            run.finish()
        except Exception as exc:  # noqa: BLE001
            _warn(f"finish failed ({exc!r})")
    if "wandb" in sys.modules:
        try:
            sys.modules["wandb"].teardown()  # waits for the wandb service to exit: the run is all on disk
        except Exception as exc:  # noqa: BLE001
            _warn(f"teardown failed ({exc!r})")
    return 0


if __name__ == "__main__":
    code = main()
    # The training process waits for this one to end. Once wandb has torn down, nothing is left to
    # write, yet the interpreter's own exit (unloading wandb's modules) takes another ~0.3 s: skip it.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # the console is gone (the launcher died): nothing to flush to
            pass
    os._exit(code)
