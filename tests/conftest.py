"""Test-wide setup: CPU only, 8 fake host devices (for mesh tests), float32 matmuls at full precision."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must come after the environment above)

jax.config.update("jax_default_matmul_precision", "highest")
