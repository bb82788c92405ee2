"""`python -m distrib.doctor`: what distrib sees, and launch mistakes. The code lives in `distrib/cli/doctor.py`;
this module keeps the command's name stable."""

import sys

from distrib.cli.doctor import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
