#!/usr/bin/env bash
# Single-process debugging: one device, no process group, num_workers=0 (breakpoint() works),
# anomaly detection and deterministic kernels, a small step limit. Arguments pass through.
set -euo pipefail
source "$(dirname "$0")/_python.sh"
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" ; echo; exec "$PYTHON" -m distrib.train --help;; esac
exec "$PYTHON" -m distrib.train --debug "$@"
