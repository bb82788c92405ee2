#!/usr/bin/env bash
# Multi-node without a scheduler: run this once on every node; torchrun agents meet at a c10d rendezvous.
#
#   NNODES=2 MASTER_ADDR=node0 launch/multinode.sh --train.epochs 2      # on each of the 2 nodes
#   NNODES=1:4 MASTER_ADDR=node0 launch/multinode.sh --train.global_batch_size 512   # elastic: 1 to 4 nodes
#
# Env-var defaults: NNODES (1; MIN:MAX for an elastic job), NPROC_PER_NODE (GPUs, or 1 on CPU),
# MASTER_ADDR (127.0.0.1) and MASTER_PORT (29500): the rendezvous endpoint, RDZV_ID (distrib): the
# same on every node of a job and different between concurrent jobs; NODE_RANK: optional, c10d assigns
# node ranks in arrival order when it is unset; MAX_RESTARTS (0, or 3 when elastic): how often the
# agents restart the group after a failure (a lost node); RDZV_CONF: torchrun's --rdzv-conf (e.g.
# last_call_timeout=30); DISTRIB_SCRIPT: your training script instead of the built-in task. Arguments
# pass through to `python -m distrib.train` (or DISTRIB_SCRIPT). docs/elastic.md: what an elastic job keeps exact.
set -euo pipefail
source "$(dirname "$0")/_python.sh"
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" ; echo; exec "$PYTHON" -m distrib.train --help;; esac
source "$(dirname "$0")/_env.sh" 1
NNODES=${NNODES:-1}
if [[ $NNODES == *:* ]]; then
    # An elastic job: a node that joins a running group waits forever for the new round's store
    # address when the agents share their rendezvous store with the workers (torch's default; pytorch
    # issue #135712). Each round then gets a store of its own.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
    MAX_RESTARTS=${MAX_RESTARTS:-3}
fi
TARGET=(-m distrib.train)
[[ -n ${DISTRIB_SCRIPT:-} ]] && TARGET=("$DISTRIB_SCRIPT")
exec "$PYTHON" -m torch.distributed.run ${TORCHRUN_SIGNALS:+"$TORCHRUN_SIGNALS"} \
    --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" ${NODE_RANK:+--node_rank="$NODE_RANK"} \
    --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" --rdzv_id="${RDZV_ID:-distrib}" \
    ${MAX_RESTARTS:+--max-restarts="$MAX_RESTARTS"} ${RDZV_CONF:+--rdzv-conf="$RDZV_CONF"} \
    "${TARGET[@]}" "$@"
