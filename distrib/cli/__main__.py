"""`python -m distrib.cli ...`: the same as the `distrib` command."""

import sys

from distrib.cli.main import command

sys.exit(command())
