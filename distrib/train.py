"""`python -m distrib.train`: train the built-in task. The code lives in `distrib/cli/train.py`;
this module keeps the command's name stable."""

import sys

from distrib.cli.train import command, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.argv[0] = "python -m distrib.train"  # what --help's usage line names (not the file, train.py)
    sys.exit(command())
