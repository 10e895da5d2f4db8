#!/usr/bin/env bash
# Run the same command on every node. c10d rendezvous at RDZV_ENDPOINT (host:port of any one node).
# Ranks are numbered node by node, and bimdist lays ranks out replica-major, so with
# pipeline.stages <= NPROC_PER_NODE a replica's whole pipeline stays on one node.
#   NNODES=2 NPROC_PER_NODE=4 RDZV_ENDPOINT=node01:29400 RDZV_ID=exp1 \
#     bash launch/torchrun/multi_node.sh vit-base-16 --pipeline.stages=4 --pipeline.replicas=2
# Where a node's host name resolves to a loopback address (containers, network namespaces, some /etc/hosts), tell
# torchrun the node's own address (LOCAL_ADDR=10.0.0.11) and, on the node of RDZV_ENDPOINT, that it hosts the
# rendezvous (RDZV_CONF=is_host=1). bimdist itself points gloo at the interface on the route to the job's store.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NPROC_PER_NODE:?set NPROC_PER_NODE}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}"
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-bimdist}" \
  ${RDZV_CONF:+--rdzv_conf="$RDZV_CONF"} ${LOCAL_ADDR:+--local_addr="$LOCAL_ADDR"} ${NODE_RANK:+--node_rank="$NODE_RANK"} \
  --max-restarts="${MAX_RESTARTS:-3}" -m bimdist "${BIMDIST_VERB:-train}" "$@"
