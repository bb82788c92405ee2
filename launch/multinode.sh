#!/usr/bin/env bash
# Multi-node without a scheduler: run this once on every node; torchrun agents meet at a c10d rendezvous.
#
#   NNODES=2 MASTER_ADDR=node0 launch/multinode.sh --train.epochs 2      # on each of the 2 nodes
#
# Env-var defaults: NNODES (1), NPROC_PER_NODE (GPUs, or 1 on CPU), MASTER_ADDR (127.0.0.1) and
# MASTER_PORT (29500): the rendezvous endpoint, RDZV_ID (distrib): the same on every node of a job and
# different between concurrent jobs; NODE_RANK: optional, c10d assigns node ranks in arrival order
# when it is unset. Arguments pass through to `python -m distrib.train`.
set -euo pipefail
source "$(dirname "$0")/_python.sh"
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" ; echo; exec "$PYTHON" -m distrib.train --help;; esac
source "$(dirname "$0")/_env.sh" 1
exec "$PYTHON" -m torch.distributed.run ${TORCHRUN_SIGNALS:+"$TORCHRUN_SIGNALS"} \
    --nnodes="${NNODES:-1}" --nproc_per_node="$NPROC_PER_NODE" ${NODE_RANK:+--node_rank="$NODE_RANK"} \
    --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" --rdzv_id="${RDZV_ID:-distrib}" \
    -m distrib.train "$@"
