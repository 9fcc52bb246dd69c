#!/usr/bin/env bash
# Sets everything up in .venv (idempotent) and runs the whole test suite on the CPU, Pallas kernels in interpret
# mode and TPU kernels and train steps compiled ahead of time with the real TPU compiler (the tpu-aot extra).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The converter's tests need transformers, which needs torch: the CPU build is enough (on this project's machines
# torch==2.13.0 is a local CPU wheel; elsewhere pip fetches it from PyPI).
# --no-compile: byte-compiling every file of the big wheels (torch, scipy, lm_eval's) costs more than the tests use.
.venv/bin/python -m pip install -q --no-compile "torch==2.13.0"
.venv/bin/python -m pip install -q --no-compile -e ".[test,data,tpu-aot,convert,eval]"
export JAX_PLATFORMS=cpu
# The suite is dominated by XLA:CPU compiles of small programs (Pallas interpret mode above all); LLVM at -O0 halves
# them, and no test times anything. Values are unchanged: the level affects codegen speed, not float semantics.
export XLA_FLAGS="--xla_backend_optimization_level=0 ${XLA_FLAGS:-}"
export ALLOW_MULTIPLE_LIBTPU_LOAD=1  # libtpu takes a lock per process; pytest-xdist runs two
exec .venv/bin/python -m pytest -n 2 "$@"
