#!/usr/bin/env bash
# Set everything up, lint and type-check (scripts/lint.sh), and run the test suite. CI (.ci/run) calls
# exactly this, with DISTRIB_SLURM=1. `bash scripts/test.sh tests/unit` is the fast inner loop (no
# process launches, under a minute).
#
# DISTRIB_SLURM=1 (needs root and apt): also install and start the two-node Slurm test cluster
# (scripts/slurm-cluster.sh) and fail, rather than skip, the Slurm tests if it is not reachable.
set -euo pipefail
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" ; echo "Other arguments go to pytest (e.g. -q tests/unit, -k resume)."; exit 0;; esac
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
if [[ "${DISTRIB_SLURM:-0}" == 1 ]]; then
    bash scripts/slurm-cluster.sh start
    export DISTRIB_REQUIRE_SLURM=1
fi
exec .venv/bin/python -m pytest "$@"
