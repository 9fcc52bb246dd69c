"""nha-jax: pretraining language models with Native Hybrid Attention in JAX (see README.md)."""
import os

import jax

# jaxlib 0.10's XLA:CPU segfaults while running the backward pass of the chunked operator at some shapes (for
# example B 2, T 64, H 4 / Hkv 2, d 16, m 8, W 8) inside its YNNPACK fusions; with them off it runs, and the results
# are XLA's ordinary CPU code. The flag only touches the CPU backend and must be set before the first computation.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
if jax.__version__.startswith("0.10.") and "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_YNN_FLAG}".strip()
