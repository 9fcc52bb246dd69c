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


# Kernel-name patterns of the GPU trace, first match wins: what a step's device time is spent on.
KERNEL_CATEGORIES = (
    ("NHA Pallas kernels", ("nha_",)),
    ("cuDNN attention", ("cudnn", "fmha", "flash", "sdpa")),
    ("matmuls (cuBLAS / cuDNN GEMM)", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "sm80_")),
    ("reductions", ("reduce", "reduction")),
    ("copies and transposes", ("copy", "transpose", "memcpy", "memset", "dynamic_update_slice", "concatenate")),
    ("other XLA fusions", ("",)),
)


def kernel_category(name: str) -> str:
    """The KERNEL_CATEGORIES label of one kernel name."""
    lowered = name.lower()
    return next(label for label, patterns in KERNEL_CATEGORIES if any(p in lowered for p in patterns))


def device_kernels(fn, args, calls=3):
    """[(kernel name, device ms)] of every kernel launched by `calls` calls of fn(*args) (after warm-up), from one
    JAX profiler trace. Names are XLA's fusion / custom-call names (Pallas kernels keep theirs)."""
    import glob
    import gzip
    import json
    import tempfile

    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and "/device:" in str(e.get("args", {}).get("name", ""))}
    if not device_pids:
        names = sorted({str(e.get("args", {}).get("name")) for e in events if e.get("name") == "process_name"})
        raise RuntimeError(f"no device in the trace (processes: {names}); kernel_table needs a GPU or TPU")
    return [(e["name"], e["dur"] / 1e3) for e in events if e.get("ph") == "X" and e.get("pid") in device_pids]


def summarize_kernels(kernels, calls, top=15, by_category=False):
    """device_kernels' list as [(name, total ms per call, launches per call)], the `top` largest, plus a final
    ("(all kernels)", ms, launches) row; by_category sums the kernels by kernel_category instead of by name."""
    import collections

    totals, counts = collections.Counter(), collections.Counter()
    for name, ms in kernels:
        name = kernel_category(name) if by_category else name
        totals[name] += ms / calls
        counts[name] += 1 / calls
    rows = [(name, ms, round(counts[name])) for name, ms in totals.most_common(top)]
    return rows + [("(all kernels)", sum(totals.values()), round(sum(counts.values())))]


def kernel_table(fn, args, top=15, calls=3):
    """Device time per kernel of `calls` calls of fn(*args): summarize_kernels of device_kernels."""
    return summarize_kernels(device_kernels(fn, args, calls), calls, top)


def print_kernel_table(title, rows):
    print(f"\n{title}: device ms per call by kernel")
    for name, ms, launches in rows:
        print(f"  {ms:9.3f} ms  x{launches:<5d} {name[:110]}")
