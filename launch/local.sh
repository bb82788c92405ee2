#!/usr/bin/env bash
# Train on this machine: torchrun over every local GPU, or 2 CPU processes on gloo when there is none.
# Env-var defaults: NPROC_PER_NODE (GPUs, or 2 on CPU); --standalone picks a free port. Arguments pass through to
# `python -m distrib.train` (e.g. --train.epochs 2 --run.dir runs/exp1).
set -euo pipefail
source "$(dirname "$0")/_python.sh"
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" ; echo; exec "$PYTHON" -m distrib.train --help;; esac
source "$(dirname "$0")/_env.sh" 2
exec "$PYTHON" -m torch.distributed.run ${TORCHRUN_SIGNALS:+"$TORCHRUN_SIGNALS"} \
    --standalone --nproc_per_node="$NPROC_PER_NODE" \
    -m distrib.train "$@"
