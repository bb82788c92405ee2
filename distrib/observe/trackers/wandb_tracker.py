"""`run.report_to wandb`: a Weights & Biases run (online with credentials, else offline in run.dir/wandb)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from records import finite_numbers, scalars


class WandbTracker:
    def start(self, run: Any) -> None:
        import wandb

        args = dict(run.options["wandb"])
        _skip_launch_inputs(wandb)
        own = Path(args["dir"]) / "wandb"  # where wandb writes inside its dir; in run.dir, distrib's to guard
        if Path(args["dir"]) == Path(run.dir) and (own.is_symlink() or (own.exists() and not own.is_dir())):
            raise RuntimeError(f"{own} is a link or a file that distrib did not create; wandb writes nothing through it")
        Path(args["dir"]).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, init_timeout=args.pop("init_timeout"), x_disable_stats=True)
        self.run = wandb.init(resume="allow", settings=settings, **args)
        where = Path(self.run.dir).parent  # run.dir is the run's files/ folder
        offline = args["mode"] == "offline"
        print(f"wandb: {args['mode']} run {self.run.id}" + (f" in {where} (upload later: wandb sync {where})" if offline else ""), flush=True)

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        self.run.log(values, step=step)

    def finish(self, summary: Any, outcome: str) -> None:
        import wandb

        try:
            self.run.summary.update(finite_numbers(summary))
            self.run.finish(exit_code=0 if outcome != "failed" else 1)
        finally:
            wandb.teardown()  # waits for the wandb service to exit: the run is all on disk


def _skip_launch_inputs(wandb: Any) -> None:
    """Skip wandb.init's look for W&B Launch inputs, which imports Launch's agent and API (~0.2 s of CPU).

    The inputs it applies are those the script staged *in its own process* (`wandb.launch.manage_config_file`
    and the like): this process runs no user code, so there are none, and the look is pure cost on
    cores the ranks are using. A wandb without that method is left as it is.
    """
    run_class = getattr(getattr(getattr(wandb, "sdk", None), "wandb_run", None), "Run", None)
    if run_class is not None and hasattr(run_class, "_detect_and_apply_job_inputs"):
        run_class._detect_and_apply_job_inputs = lambda self: None
