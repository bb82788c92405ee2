"""The `distrib` command: `distrib train|doctor|export|report|slurm submit ...`."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence

from distrib.errors import error_exit
from distrib.runtime import shutdown

USAGE = """usage: distrib <command> [args]

commands:
  train           train the built-in task (same as python -m distrib.train)
  doctor          print what distrib sees (launcher, ranks, devices, Slurm, master) and flag launch mistakes
  export CKPT --out model.pt   a checkpoint's model (FSDP-sharded or not) as one plain state_dict file
  report RUN_DIR  plot metrics.jsonl (loss, lr, throughput, data wait) to RUN_DIR/report.png, print a summary
  slurm submit    [--nodes N] [--gpus-per-node G] [--time T] [--partition P] [--dry-run] -- TRAIN ARGS
"""


COMMANDS = ("train", "doctor", "export", "report", "slurm submit")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "train":
        if argv is None:  # the `distrib` command itself: --help's usage line names it
            sys.argv[0] = "distrib train"
        from distrib.cli.train import main as train_main

        return train_main(rest)
    if command == "doctor":
        from distrib.cli.doctor import main as doctor_main

        return doctor_main(rest)
    if command == "export":
        from distrib.cli.export import main as export_main

        return export_main(rest)
    if command == "report":
        from distrib.cli.report import main as report_main

        return report_main(rest)
    if command == "slurm" and rest[:1] == ["submit"]:
        from distrib.cli.slurm import submit_main

        return submit_main(rest[1:])
    if command == "slurm" and (not rest or rest[0] in ("-h", "--help")):
        print(
            "usage: distrib slurm submit [--nodes N] [--gpus-per-node G] [--time T] [--partition P] [--dry-run] -- TRAIN ARGS\n\n"
            "Submit the built-in task as a Slurm batch job; `distrib slurm submit --help` lists the options."
        )
        return 0
    close = difflib.get_close_matches(" ".join(args[:2]) if command == "slurm" else command, COMMANDS, n=1)
    hint = f"did you mean `distrib {close[0]}`?" if close else "`distrib --help` lists the commands."
    return error_exit(f"unknown command {' '.join(args[:2]) if command == 'slurm' else command!r}. HINT: {hint}")


command = shutdown.command(main)  # the console script and `python -m`


if __name__ == "__main__":
    sys.exit(command())
