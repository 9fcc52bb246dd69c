#!/usr/bin/env bash
# Sets everything up in .venv (idempotent) and trains the default config: a small NHA LM on text that ships with
# Python, on the CPU. Extra arguments go to train.py, e.g. --config.total_steps=100.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
# The default config is a CPU run; pinning the platform also silences libtpu's probe when the tpu-aot extra is in
# .venv. On a GPU or TPU, run train.py directly with a config made for it.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python train.py --config configs/default.py "$@"
