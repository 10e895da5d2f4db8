#!/usr/bin/env bash
# The prepared GPU check: at most 8 minutes on one GPU. Every figure goes to benchmarks/results/ named after the card.
#   bash tests/gpu/run.sh
# Where no CUDA device is visible it exits 0 and says what it skipped. Without internet (a lent GPU machine), the
# packages that machine lacks travel as wheels in .whl/: `bash tests/gpu/fetch_wheels.sh` here first.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -d .whl ] && ! $PY -c "import pydantic, webdataset, simplejpeg" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/bimdist-site .whl/*.whl && \
    export PYTHONPATH="/tmp/bimdist-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
SKIPPED="GPU-marked tests (transport with CUDA tensors, single-GPU pipeline vs sequential, bf16 autocast, decoder \
slices, sync-free steps, GPU decode parity); benchmarks.stages (ViT-B/16 per-stage samples/s and MFU, bf16, batch \
256) and benchmarks.model from them; benchmarks.memory on CUDA (ViT-B/16); benchmarks.data's GPU-decode row; bimdist \
doctor on the GPU"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "tests/gpu/run.sh: no CUDA device is visible; skipped: $SKIPPED"
  exit 0
fi
$PY -c "import torch; print('tests/gpu/run.sh on', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
status=0
step() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" || { echo "tests/gpu/run.sh: $name FAILED (exit $?)"; status=1; }
  echo "tests/gpu/run.sh: $name took $((SECONDS - t0)) s"
}
step "GPU tests" 150 $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider
step "stage throughput and MFU" 60 $PY -m benchmarks.stages
step "scaling model from measured stages" 45 $PY -m benchmarks.model --no-readme
step "memory on CUDA (ViT-B/16)" 120 $PY -m benchmarks.memory --only ViT-B
step "GPU decode" 90 $PY -m benchmarks.data --gpu-only --images 600 --rounds 3 --batches 16
step "doctor" 60 $PY -m bimdist doctor vit-base-16 --data.source=synthetic --json benchmarks/results/doctor-gpu.json
exit $status
