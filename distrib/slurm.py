"""`python -m distrib.slurm`: the sbatch files' prologue and epilogue, and `submit`. The code lives in `distrib/cli/slurm.py`;
this module keeps the command's name stable."""

import sys

from distrib.cli.slurm import command, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(command())
