#!/usr/bin/env bash
# Creates .venv (if missing) and installs fxcache with its test and kernel extras.
# torch is pinned here (and only here) to the CPU wheel that lies on this machine's disk;
# the library itself asks for a range (see pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q -c scripts/constraints.txt torch
python -m pip install -q -c scripts/constraints.txt -e ".[test,triton]"
