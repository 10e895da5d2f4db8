#!/usr/bin/env bash
# Wheels of what a lent GPU machine lacks (its image has torch, timm, numpy, scikit-learn, prometheus-client, ...,
# but not these), for Python 3.12 on x86-64, into .whl/ (git-ignored). tests/gpu/run.sh installs them from there.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pydantic pydantic-core annotated-types typing-inspection webdataset braceexpand simplejpeg
ls .whl
