"""The `distrib` command: `distrib train ...` (more subcommands join as they are built)."""

from __future__ import annotations

import sys
from typing import Sequence

USAGE = """usage: distrib <command> [args]

commands:
  train    train the built-in task (same as python -m distrib.train)
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "train":
        from distrib.train import main as train_main

        return train_main(rest)
    print(f"distrib: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
