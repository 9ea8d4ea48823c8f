#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
