#!/usr/bin/env bash
# Sets everything up in .venv (idempotent) and runs the test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,data]"
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -n 2 "$@"
