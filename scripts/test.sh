#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), runs the CPU test suite, then the GPU readiness
# check in CPU mode (scripts/gpu_check.sh --cpu, about 20 s): it skips what needs CUDA,
# saying so, and checks that the script itself still runs. On a GPU machine run
# `bash scripts/gpu_check.sh` for the CUDA checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
bash scripts/gpu_check.sh --cpu
