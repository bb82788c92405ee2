"""Commands: `distrib` (`main.py`) and its subcommands, `python -m distrib.train` on the built-in
task (`train.py`, `task.py`), `doctor`, `export`, `report` and the Slurm helpers (`slurm.py`).

Imports: any layer. The top layer: nothing in the package imports it but the entry points
(`distrib/train.py`, `distrib/slurm.py`, `distrib/doctor.py`).
"""
