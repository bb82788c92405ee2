"""Commands: `distrib` (`main.py`) and its subcommands, `python -m distrib.train` on the built-in
task (`train.py`, `task.py`), `doctor`, `export`, `report` and the Slurm helpers (`slurm.py`).

The top layer: imports anything, imported by nothing in the package but the entry-point shims
(`distrib/train.py`, `distrib/slurm.py`, `distrib/doctor.py`).
"""
