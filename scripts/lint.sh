#!/usr/bin/env bash
# Lint, format check and type check: ruff (configured in pyproject.toml) on everything, mypy on distrib/.
# scripts/test.sh runs this before the tests; `--fix` applies ruff's fixes and formatting instead of checking.
set -euo pipefail
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" ; exit 0;; esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ " $* " == *" --fix "* ]]; then
    "$PY" -m ruff check --fix .
    "$PY" -m ruff format .
else
    "$PY" -m ruff check .
    "$PY" -m ruff format --check .
fi
"$PY" -m mypy
"$PY" -m distrib.config.reference --check
