#!/usr/bin/env bash
# The GPU check (#30): everything a GPU must confirm, in one command, within a budget (default 8 minutes).
#   scripts/gpu-check.sh [--budget-s 300]          # on a CUDA machine; results in bench/results/gpu-<date>-<device>.json/.md
#   scripts/gpu-check.sh --device cpu --smoke      # the same code on the CPU, tiny sizes (what CI runs)
# Without CUDA (and without --device cpu) it says so and exits 0. Runs bench/gpu.py with the project's venv,
# or where there is none (a lent GPU machine with its own torch) python3, with the checkout on PYTHONPATH.
set -euo pipefail
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" ; exit 0;; esac
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" bench/gpu.py "$@"
