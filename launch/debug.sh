#!/usr/bin/env bash
# Single-process debugging: one device, no process group, num_workers=0 (breakpoint() works),
# anomaly detection and deterministic kernels, a small step limit. Arguments pass through.
set -euo pipefail
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m distrib.train --debug "$@"
