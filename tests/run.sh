#!/usr/bin/env bash
# Set up everything the tests need (Debian packages, .venv) and run the whole suite.
#   bash tests/run.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
ruff check bimdist tests benchmarks
# two test processes: most tests wait on subprocess start-up and timeouts, not on the CPU
python -m pytest -q -n 2 --dist loadgroup --durations=25 "$@"
