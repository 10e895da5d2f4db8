#!/usr/bin/env bash
# Set up bimdist on a Debian/Ubuntu machine: Debian packages (when apt is available and we are root), and a virtual
# environment in .venv with PyTorch and bimdist (editable). Safe to run again.
#   bash launch/setup.sh             # everything the test suite needs (Slurm, Prometheus, DeepSpeed, ...)
#   bash launch/setup.sh demo        # only what the demo needs: Fashion-MNIST, PyTorch, bimdist
#   BIMDIST_APT=0 bash launch/setup.sh   # skip the Debian packages
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-test}
case "$PROFILE" in
  demo) APT_PACKAGES=(dataset-fashion-mnist); EXTRAS=eval; CHECK="import bimdist, timm, webdataset, sklearn" ;;
  test) APT_PACKAGES=(dataset-fashion-mnist prometheus prometheus-pushgateway slurm-wlm munge docker-compose numactl
                     iproute2)
        EXTRAS=test; CHECK="import bimdist, timm, webdataset, sklearn, deepspeed, pytest, xdist" ;;
  *) echo "setup: unknown profile '$PROFILE' (demo or test)" >&2; exit 2 ;;
esac

if [ "${BIMDIST_APT:-1}" = 1 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing PyTorch"
  # torch 2.14.1 + torchvision 0.29.1 are the pair timm imports with here; setup.cfg only asks for torch>=2.4.
  pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" || true
fi
if ! python -c "$CHECK" 2>/dev/null; then
  echo "setup: installing bimdist and its dependencies ($EXTRAS)"
  DS_BUILD_OPS=0 pip install -q -e ".[$EXTRAS]" 2>&1 | grep -vE "is ignored|^\s*!!|WheelFile|with strategy" || true
fi
# DeepSpeed JIT-compiles its CPU communication op on first use (20-60 s); build it once into the cache.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if [ "$PROFILE" = test ] && [ ! -d "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm" ] \
    && python -c "import torch,sys; sys.exit(torch.cuda.is_available())"; then
  echo "setup: pre-building DeepSpeed's shm_comm op into $TORCH_EXTENSIONS_DIR"
  python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" \
    >/dev/null 2>&1 || echo "setup: could not pre-build shm_comm (DeepSpeed will build it on first use)"
fi
python -c "import bimdist, torch; print(f'setup: bimdist {bimdist.__version__}, torch {torch.__version__}, ready')"
