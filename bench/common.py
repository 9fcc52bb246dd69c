"""Shared pieces of the GPU benchmarks: NHA-shaped random inputs and a robust timer."""
import statistics
import time

import jax
import jax.numpy as jnp


def make_inputs(key, batch, seq, heads=16, kv_heads=16, dk=128, dv=128, m=64, dtype=jnp.bfloat16):
    """Random q, k, v (dtype), log_alpha (float32, logsigmoid(f) / 8 as in the model) and an output cotangent."""
    kq, kk, kv, kf, kc = jax.random.split(key, 5)
    q = jax.random.normal(kq, (batch, seq, heads, dk), dtype)
    k = jax.random.normal(kk, (batch, seq, kv_heads, dk), dtype)
    v = jax.random.normal(kv, (batch, seq, kv_heads, dv), dtype)
    log_alpha = jax.nn.log_sigmoid(jax.random.normal(kf, (batch, seq, kv_heads, m), jnp.float32) * 2) / 8
    cotangent = jax.random.normal(kc, (batch, seq, heads, dv), dtype)
    return q, k, v, log_alpha, cotangent


def median_ms(fn, args, reps=30, inner=5):
    """Median over `reps` of the mean time of `inner` back-to-back calls, in ms, after warm-up (compile included)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) * 1e3 / inner)
    return statistics.median(times)


def forward_and_backward(fn):
    """fn(q, k, v, log_alpha) -> jitted (q, k, v, log_alpha, cotangent) -> all four gradients (a VJP)."""
    def run(q, k, v, log_alpha, cotangent):
        out, vjp = jax.vjp(fn, q, k, v, log_alpha)
        return vjp(cotangent)
    return jax.jit(run)


def compiled_bytes(jitted, *args):
    """Device bytes the compiled program needs: arguments + outputs + temporaries (XLA's own accounting)."""
    mem = jitted.lower(*args).compile().memory_analysis()
    return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
