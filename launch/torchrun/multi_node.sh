#!/usr/bin/env bash
# Run the same command on every node. c10d rendezvous at RDZV_ENDPOINT (host:port of any one node).
# Ranks are numbered node by node, and bimdist lays ranks out replica-major, so with
# pipeline.stages <= NPROC_PER_NODE a replica's whole pipeline stays on one node.
#   NNODES=2 NPROC_PER_NODE=4 RDZV_ENDPOINT=node01:29400 RDZV_ID=exp1 \
#     bash launch/torchrun/multi_node.sh vit-base-16 --pipeline.stages=4 --pipeline.replicas=2
set -euo pipefail
: "${NNODES:?set NNODES}" "${NPROC_PER_NODE:?set NPROC_PER_NODE}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}"
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-bimdist}" \
  --max-restarts="${MAX_RESTARTS:-3}" -m bimdist "${BIMDIST_VERB:-train}" "$@"
