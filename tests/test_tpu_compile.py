"""The NHA TPU kernels compile, forward and backward, with the real Mosaic compiler for real TPU topologies.

No TPU is attached: libtpu (the `tpu-aot` extra) compiles ahead of time for a topology description. Interpret mode
checks the numbers (tests/test_pallas_tpu.py); this checks what the hardware compiler accepts: tiling, layouts,
VMEM. The full product (3 chips x head dims 64/128/256 x m 32/64 x W 0/64/512/full, 72 compiles) takes about ten
minutes, so CI runs a subset that gives every chip every head dim once and every m and W on at least two chips;
NHA_TPU_COMPILE_FULL=1 runs the full product.
"""
import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Several processes load libtpu at once under pytest-xdist (and other engineers' compile tests): without this,
# libtpu's lockfile lets only the first one in ("Internal error when accessing libtpu multi-process lockfile").
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
pytest.importorskip("libtpu", reason="needs the tpu-aot extra: pip install -e '.[tpu-aot]'")
from jax.experimental import topologies  # noqa: E402

from pallas_kernels.tpu import nha_attention_tpu  # noqa: E402

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
T = 1024
FULL = T  # a window that covers the whole sequence: causal softmax attention plus sinks


@functools.cache
def _mesh(chip):
    devices = topologies.get_topology_desc(topology_name=TOPOLOGIES[chip], platform="tpu").devices
    return Mesh(np.array(devices), ("data",))


def _compile_train_pass(chip, head_dim, m, window, dtype=jnp.bfloat16):
    """Lowers and compiles value_and_grad of the kernels under shard_map (batch over the chip's devices)."""
    mesh = _mesh(chip)
    B, H, Hkv = mesh.size, 4, 2

    def loss(q, k, v, log_alpha, segment_ids, positions):
        out = nha_attention_tpu(q, k, v, log_alpha, segment_ids, positions, window=window, scale=None,
                                rope_theta=10000.0)
        return jnp.sum(out.astype(jnp.float32))

    def train_pass(*args):
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args)

    batch = P("data")
    sharded = jax.jit(jax.shard_map(train_pass, mesh=mesh, in_specs=(batch,) * 6, out_specs=(P(), (batch,) * 4),
                                    check_vma=False))
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, batch))
    args = (spec((B, T, H, head_dim), dtype), spec((B, T, Hkv, head_dim), dtype), spec((B, T, Hkv, head_dim), dtype),
            spec((B, T, Hkv, m), jnp.float32), spec((B, T), jnp.int32), spec((B, T), jnp.int32))
    lowered = sharded.lower(*args)
    return lowered, lowered.compile()


# (chip, head dim, m, window)
GRID = [
    ("v5e", 64, 32, 0),
    ("v5e", 128, 64, 512),
    ("v5e", 256, 32, FULL),
    ("v5p", 64, 64, 64),
    ("v5p", 128, 32, FULL),
    ("v5p", 256, 64, 0),
    ("v6e", 64, 32, 512),
    ("v6e", 128, 64, 0),
    ("v6e", 256, 64, 64),
]
if os.environ.get("NHA_TPU_COMPILE_FULL") == "1":
    GRID = list(itertools.product(TOPOLOGIES, (64, 128, 256), (32, 64), (0, 64, 512, FULL)))


@pytest.mark.parametrize("chip, head_dim, m, window", GRID)
def test_forward_and_backward_kernels_compile(chip, head_dim, m, window):
    lowered, compiled = _compile_train_pass(chip, head_dim, m, window)
    hlo = lowered.as_text()
    # The Mosaic kernels themselves are in the program, not an XLA fallback: forward, slot backward, window dq/dkv.
    kernels = {"nha_tpu_forward", "nha_tpu_slot_backward"} | ({"nha_tpu_window_dq", "nha_tpu_window_dkv"}
                                                              if window else set())
    assert hlo.count("tpu_custom_call") >= len(kernels)
    for name in kernels:
        assert name in hlo, name
    assert compiled.memory_analysis() is not None


def _compile_kernel(kernel, block, dtype=jnp.float32):
    """Compiles a one-input Pallas kernel over a (16, 256) array in `block`-sized tiles, for v5e."""
    mesh = _mesh("v5e")
    shape = (16, 256)
    call = pl.pallas_call(kernel, grid=(shape[0] // block[0], shape[1] // block[1]),
                          in_specs=[pl.BlockSpec(block, lambda i, j: (i, j))],
                          out_specs=pl.BlockSpec(block, lambda i, j: (i, j)),
                          out_shape=jax.ShapeDtypeStruct(shape, jnp.float32))
    sharded = jax.jit(jax.shard_map(call, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
    return sharded.lower(jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))).compile()


def _double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0


def _square_tile(precision):
    def kernel(x_ref, o_ref):
        x = x_ref[...]
        o_ref[...] = jax.lax.dot_general(x, x, (((1,), (1,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)[:, :1] + jnp.zeros_like(o_ref)
    return kernel


def test_mis_tiled_block_is_rejected():
    """The check can fail: a (8, 64) f32 block breaks the (8, 128) tiling and the TPU lowering refuses it."""
    _compile_kernel(_double, (8, 128))
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        _compile_kernel(_double, (8, 64))


def test_mosaic_compiler_rejects_what_interpret_mode_accepts():
    """Past the lowering, the Mosaic compiler itself refuses fp32 passes on bf16 operands (our kernels pin the
    precision for this reason: a global jax_default_matmul_precision="highest" used to trigger it)."""
    _compile_kernel(_square_tile(jax.lax.Precision.DEFAULT), (8, 128), jnp.bfloat16)
    with pytest.raises(Exception, match="Mosaic failed to compile"):
        _compile_kernel(_square_tile(jax.lax.Precision.HIGHEST), (8, 128), jnp.bfloat16)
