#!/usr/bin/env bash
# bimdist under the deepspeed launcher (it appends --local_rank, which bimdist accepts).
#   NUM_GPUS=4 bash launch/deepspeed/run.sh fmnist-tiny --pipeline.stages=4
#   HOSTFILE=launch/deepspeed/hostfile [NODE_RANK=0 MASTER_ADDR=node01] bash launch/deepspeed/run.sh vit-base-16 --pipeline.stages=4 \
#     --pipeline.replicas=2 --pipeline.engine=deepspeed --pipeline.deepspeed_config=launch/deepspeed/zero1-bf16.json
# On a CPU machine --num_gpus N still starts N ranks. DeepSpeed JIT-compiles its ops on first use:
# TORCH_EXTENSIONS_DIR keeps them between runs.
set -euo pipefail
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
PORT=${MASTER_PORT:-29500}
VERB=${BIMDIST_VERB:-train}  # or finetune: BIMDIST_VERB=finetune NUM_GPUS=4 bash launch/deepspeed/run.sh RUN_DIR --depth 4
if [ -n "${HOSTFILE:-}" ] && [ -n "${NODE_RANK:-}" ]; then
  # No ssh: run this same command on every node with its NODE_RANK and the first node's MASTER_ADDR.
  exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?}" \
    --master_port "$PORT" --module bimdist "$VERB" "$@"
fi
if [ -n "${HOSTFILE:-}" ]; then
  # From one node, reaching the others over passwordless ssh (pdsh).
  exec deepspeed --hostfile "$HOSTFILE" --master_port "$PORT" --module bimdist "$VERB" "$@"
fi
exec deepspeed --num_gpus "${NUM_GPUS:-4}" --master_port "$PORT" --module bimdist "$VERB" "$@"
