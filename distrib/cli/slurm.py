"""Slurm jobs: what the sbatch files compute (run dir, rendezvous, processes per node), the
requeue decision after a graceful stop, and `distrib slurm submit`.

The sbatch files in `slurm/` stay thin: they call `python -m distrib.slurm prologue` for their
variables and `python -m distrib.slurm epilogue` for the requeue, so that logic lives (and is
tested) here once. Every count comes from `SLURM_*` variables, never from a number the sbatch
header already sets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from distrib.errors import CommandParser, ConfigError, DistribError, error_exit
from distrib.runtime import shutdown
from distrib.runtime.env import expand_hostlist, slurm_port
from distrib.runtime.stop import EXIT_STOPPED, LAUNCHER_SIGNALS, STOPPED_FILE, torchrun_signal_flag

DEFAULT_MAX_REQUEUES = 20
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


def run_dir_from(args: Sequence[str], job_id: str) -> str:
    """The `--run.dir` the user passed, else `runs/slurm-<job id>`: a requeued job keeps its id, so its dir."""
    for i, arg in enumerate(args):
        if arg == "--run.dir" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--run.dir="):
            return arg.split("=", 1)[1]
    return f"runs/slurm-{job_id}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobPlan:
    """What one batch job runs: derived from the allocation, identical on a requeue."""

    run_dir: str
    nnodes: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    job_id: str
    stop_mark: str = "none"
    """The run's stopped.json as the job step found it (`stop_mark`): the epilogue requeues only on a newer one."""

    def exports(self) -> str:
        """Shell lines the sbatch files `eval`."""
        values = {
            "DISTRIB_RUN_DIR": self.run_dir,
            "DISTRIB_NNODES": self.nnodes,
            "DISTRIB_NPROC_PER_NODE": self.nproc_per_node,
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": self.master_port,
            "DISTRIB_TORCHRUN_SIGNALS": torchrun_signal_flag(),
            "TORCHELASTIC_SIGNALS_TO_HANDLE": LAUNCHER_SIGNALS,  # what older torch reads instead of the flag
            "DISTRIB_STOP_MARK": self.stop_mark,
        }
        return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in values.items())


def plan(args: Sequence[str], env: Mapping[str, str]) -> JobPlan:
    """The job's plan from the allocation's `SLURM_*` variables (inside a batch script)."""
    job_id = env.get("SLURM_JOB_ID")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not job_id or not nodelist:
        raise ConfigError("SLURM_JOB_ID/SLURM_JOB_NODELIST are not set: this runs inside an sbatch job. HINT: sbatch slurm/train.sbatch ...")
    nodes = expand_hostlist(nodelist)
    max_requeues(env)  # a bad cap fails the job now, before it trains, not at its end
    run_dir = run_dir_from(args, job_id)
    return JobPlan(
        run_dir=run_dir,
        stop_mark=stop_mark(run_dir),
        nnodes=int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(nodes)),
        nproc_per_node=processes_per_node(env),
        master_addr=nodes[0],
        master_port=slurm_port(job_id),
        job_id=job_id,
    )


def processes_per_node(env: Mapping[str, str]) -> int:
    """The allocation's GPUs on this node (SLURM_GPUS_ON_NODE), else NPROC_PER_NODE, else 1 (a CPU process)."""
    for name in ("SLURM_GPUS_ON_NODE", "NPROC_PER_NODE"):
        raw = env.get(name, "")
        if re.fullmatch(r"\d+", raw) and int(raw) > 0:
            return int(raw)
    return 1


def max_requeues(env: Mapping[str, str]) -> int:
    """DISTRIB_MAX_REQUEUES (default 20), checked: a whole number >= 0."""
    raw = env.get("DISTRIB_MAX_REQUEUES") or str(DEFAULT_MAX_REQUEUES)
    if not re.fullmatch(r"\s*\d+\s*", raw):
        raise ConfigError(
            f"DISTRIB_MAX_REQUEUES={raw!r} is not a whole number. HINT: export DISTRIB_MAX_REQUEUES=20 "
            "(how often a stopped job may requeue itself), or unset it for the default 20."
        )
    return int(raw)


def stop_mark(run_dir: str) -> str:
    """Which stopped.json the run directory holds (inode and mtime, `none` if none): a new write is a new mark.

    The run writes it by an atomic rename, so a stop of this very step changes the mark, while an
    earlier step's file that a failed start left in place keeps it. No clock is compared, so nodes
    whose clocks differ cannot confuse it.
    """
    try:
        st = os.stat(Path(run_dir) / STOPPED_FILE)
    except OSError:
        return "none"
    return f"{st.st_ino}-{st.st_mtime_ns}"


def epilogue(run_dir: str, status: int, env: Mapping[str, str], *, requeue: Sequence[str] = ("scontrol", "requeue")) -> int:
    """After the training step: requeue the job if this very step stopped on a signal with a checkpoint.

    Returns the batch script's exit status. The proof of a graceful stop is a stopped.json written
    by this step (another mark than the prologue's `DISTRIB_STOP_MARK`) that says exit status 75:
    torchrun reports its workers' 75 as 1, so the step's own status cannot tell. A step that failed
    before the run opened its files (peers that never met, a refused resume) leaves the earlier
    step's file, and its failure is reported as a failure. A job requeued `DISTRIB_MAX_REQUEUES`
    times (default 20; Slurm counts them in SLURM_RESTART_COUNT) is not requeued again, so a job
    that is signalled at every start cannot loop forever.
    """
    stopped = Path(run_dir) / STOPPED_FILE
    if not stopped.exists():
        return status
    before = env.get("DISTRIB_STOP_MARK")
    fresh = stop_mark(run_dir) != before if before is not None else status == EXIT_STOPPED
    try:
        graceful = fresh and json.loads(stopped.read_text()).get("exit_status") == EXIT_STOPPED
    except (OSError, ValueError, AttributeError):
        graceful = False
    if not graceful:
        if status != 0:
            print(
                f"distrib: the training step failed (exit status {status}) without a graceful stop; not requeueing "
                f"({stopped} is an earlier step's). Fix the cause, then resubmit with the same --run.dir to resume.",
                flush=True,
            )
        return status
    try:
        cap = max_requeues(env)
    except ConfigError as exc:
        return error_exit(exc)
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    job_id = env.get("SLURM_JOB_ID", "")
    if restarts >= cap:
        print(
            f"distrib: stopped with a checkpoint, but job {job_id} was already requeued {restarts} times "
            f"(DISTRIB_MAX_REQUEUES={cap}): not requeueing. Resubmit with the same --run.dir to continue.",
            flush=True,
        )
        return EXIT_STOPPED
    print(
        f"distrib: stopped with a checkpoint in {run_dir}; requeueing job {job_id} (requeue {restarts + 1} of at most {cap}); it resumes on its own.",
        flush=True,
    )
    done = subprocess.run([*requeue, job_id], capture_output=True, text=True)
    if done.returncode != 0:
        # E.g. a preemption that Slurm requeues itself; the job then resumes all the same.
        print(f"distrib: {' '.join(requeue)} {job_id} failed: {done.stderr.strip()}", flush=True)
        return EXIT_STOPPED
    return 0


# --------------------------------------------------------------------------- submit


_TIME = re.compile(r"[0-9]+(-[0-9]+)?(:[0-9]+){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)
_PARTITION = re.compile(r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*")
_ALLOWED = {"time": "'-' and ':'", "partition": "'_', '.', '-' and ','"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SubmitOptions:
    nodes: int | None = None
    gpus_per_node: int | None = None
    time: str | None = None
    partition: str | None = None
    template: str = "train"

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={value} must be >= 1. HINT: omit it to take the template's default.")
        if self.template not in ("train", "srun"):
            raise ConfigError(f"--template={self.template!r} is not one of train, srun.")
        # Each value becomes an #SBATCH line of a shell script: a newline or a shell character in it would
        # be a command of its own. Slurm's own formats need none of them.
        for name, value, pattern, example in (
            ("time", self.time, _TIME, "04:00:00, 90 or 1-12:00:00"),
            ("partition", self.partition, _PARTITION, "gpu or gpu,debug"),
        ):
            if value is not None and not pattern.fullmatch(value):
                raise ConfigError(
                    f"--{name}={value!r} is not a Slurm {name} (only letters, digits and {_ALLOWED[name]} are allowed). HINT: pass e.g. --{name} {example}."
                )


def template_text(name: str) -> str:
    return (TEMPLATES / f"{name}.sbatch").read_text()


def render(opts: SubmitOptions, train_args: Sequence[str], *, python: str = sys.executable) -> str:
    """The sbatch script: the template with the options as `#SBATCH` lines and the train arguments baked in.

    The result is a complete script: `sbatch` accepts it as it is, with no further arguments.
    """
    text = template_text(opts.template)
    header = [
        f"#SBATCH --{k}={v}"
        for k, v in (("nodes", opts.nodes), ("gpus-per-node", opts.gpus_per_node), ("time", opts.time), ("partition", opts.partition))
        if v is not None
    ]
    baked = [
        f"export PYTHON=${{PYTHON:-{shlex.quote(python)}}}",
        f'set -- {" ".join(shlex.quote(a) for a in train_args)} "$@"' if train_args else "",
    ]
    lines = text.splitlines()
    # Options go after the template's own #SBATCH lines (sbatch: the last occurrence wins) and
    # before the first command; both must sit before any command for sbatch to read them.
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    out = lines[: last + 1] + header + [line for line in baked if line] + lines[last + 1 :]
    return "\n".join(out) + "\n"


def submit(opts: SubmitOptions, train_args: Sequence[str], *, dry_run: bool) -> int:
    script = render(opts, train_args)
    if dry_run:
        sys.stdout.write(script)
        return 0
    done = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"distrib: sbatch failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    print(done.stdout.strip().split(";")[0])
    return 0


def submit_main(argv: Sequence[str]) -> int:
    """`distrib slurm submit [--nodes N] [--gpus-per-node G] [--time T] [--partition P] [--dry-run] -- ARGS`."""
    argv = list(argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    p = CommandParser(prog="distrib slurm submit", description="Render slurm/train.sbatch with these options and submit it.")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--time", help="Slurm time limit, e.g. 04:00:00")
    p.add_argument("--partition")
    p.add_argument("--template", default="train", choices=("train", "srun"), help="train: torchrun per node; srun: one task per GPU")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    ns = p.parse_args(argv)
    try:
        opts = SubmitOptions(nodes=ns.nodes, gpus_per_node=ns.gpus_per_node, time=ns.time, partition=ns.partition, template=ns.template)
        check_train_args(train_args)
    except ConfigError as exc:
        return error_exit(exc)
    return submit(opts, train_args, dry_run=ns.dry_run)


def check_train_args(train_args: Sequence[str]) -> None:
    """The job's training arguments, checked now as the job will read them: a typo fails here, not in the queue."""
    from distrib.checkpoint.rundir import check_run_dir
    from distrib.cli.task import SECTIONS
    from distrib.config import parse_config

    cfg = parse_config(list(train_args), sections=SECTIONS)
    if "--run.dir" in train_args:
        check_run_dir(cfg.run.dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Helpers the sbatch files call: `prologue -- ARGS` prints exports; `epilogue RUN_DIR STATUS` requeues."""
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m distrib.slurm prologue -- ARGS | epilogue RUN_DIR STATUS | submit ..."
    if args[:1] != ["submit"] and any(a in ("-h", "--help") for a in args[:2]):
        print(f"{usage}\n\n{main.__doc__}")
        return 0
    if args[:1] == ["prologue"]:
        rest = args[2:] if args[1:2] == ["--"] else args[1:]
        try:
            exports = plan(rest, os.environ).exports()
        except DistribError as exc:  # e.g. run outside an allocation: the message and the fix, not a traceback
            return error_exit(exc)
        sys.stdout.write(exports)
        return 0
    if args[:1] == ["epilogue"] and len(args) == 3 and args[2].isdigit():
        return epilogue(args[1], int(args[2]), os.environ)
    if args[:1] == ["submit"]:
        return submit_main(args[1:])
    print(usage, file=sys.stderr)
    return 2


command = shutdown.command(main)  # the console script and `python -m`


if __name__ == "__main__":
    sys.exit(command())
