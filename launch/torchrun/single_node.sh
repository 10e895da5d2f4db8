#!/usr/bin/env bash
# One node, NPROC ranks under torchrun. A rank that dies makes torchrun restart every rank (up to
# MAX_RESTARTS times); the restarted ranks resume from the newest checkpoint that every stage completed.
#   NPROC=4 bash launch/torchrun/single_node.sh fmnist-tiny --pipeline.stages=4 --checkpoint.every=100
#   BIMDIST_VERB=finetune NPROC=4 bash launch/torchrun/single_node.sh runs/fmnist-tiny --depth 4   # 4 DP ranks
set -euo pipefail
NPROC=${NPROC:-4}
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  --max-restarts="${MAX_RESTARTS:-3}" -m bimdist "${BIMDIST_VERB:-train}" "$@"
