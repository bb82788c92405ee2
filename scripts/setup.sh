#!/usr/bin/env bash
# Create .venv and install distrib with its dev and benchmark (accelerate, lightning) dependencies.
# Idempotent; safe to re-run.
#
# torch: the project asks for a normal range (torch>=2.4), so GPU machines get a CUDA build.
# Where no NVIDIA GPU is visible we pin torch 2.13.0 (on CI and our dev machines a CPU build that
# installs from local disk); override with TORCH_SPEC="torch==X.Y.Z" or TORCH_SPEC="torch".
set -euo pipefail
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" ; exit 0;; esac
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
if [[ -z "${TORCH_SPEC:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        TORCH_SPEC="torch>=2.4"
    else
        TORCH_SPEC="torch==2.13.0"
    fi
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
.venv/bin/python -c 'import torch, distrib; print(f"distrib ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}")'
