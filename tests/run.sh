#!/usr/bin/env bash
# Set up everything the tests need (Debian packages, .venv) and run the whole suite.
#   bash tests/run.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
ruff check bimdist tests benchmarks
# two test processes, each test file on one of them (a file's module fixtures, such as its Slurm cluster and the
# job ports that cluster's job IDs give, are never live twice at once; xdist_group marks are ignored by pytest 9)
python -m pytest -q -n 2 --dist loadfile --durations=25 "$@"
