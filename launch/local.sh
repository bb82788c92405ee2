#!/usr/bin/env bash
# Train on this machine: torchrun over every local GPU, or 2 CPU processes on gloo when there is none.
# Env-var defaults: NPROC_PER_NODE (GPUs, or 2 on CPU); --standalone picks a free port. Arguments pass through to
# `python -m distrib.train` (e.g. --train.epochs 2 --run.dir runs/exp1).
set -euo pipefail
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
if [[ "$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')" == 0 ]]; then
    # One thread per rank: N CPU ranks each using every core would oversubscribe the machine.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec "$PYTHON" -m torch.distributed.run \
    --standalone --nproc_per_node="$NPROC_PER_NODE" \
    -m distrib.train "$@"
