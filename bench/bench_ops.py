"""Issue-2 benchmark: the chunked XLA path of nha_attention against cuDNN and XLA softmax attention, one GPU.

Times forward and forward+backward (bf16, median of many runs after warm-up) at
S1 = (B=8, T=2048) and S2 = (B=2, T=8192), H=16, dk=dv=128, m=64, W=64, for several variants of the chunked path
(chunk C / sub-chunk c / tokens per scan step), then reports the compiled memory of the default variant's
forward+backward at B=1, T = 2K..32K next to dense XLA attention's. With --check it first compares the chunked path
with the dense reference on this device, float32 at "highest" matmul precision and bf16 at the default.
Usage (GPU machine): python bench/bench_ops.py [--reps 20] [--variants 64/8/512,32/8/512] [--check]
"""
import argparse
import datetime

import jax
import jax.numpy as jnp

from bench.common import compiled_bytes, forward_and_backward, make_inputs, median_ms
from nha_jax.ops import chunked as chunked_module
from nha_jax.ops import nha_attention

WINDOW = 64


def chunked(chunk_size):
    return lambda q, k, v, la: nha_attention(q, k, v, la, window=WINDOW, impl="chunked", chunk_size=chunk_size)


def softmax_attention(implementation):
    return lambda q, k, v, la: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def use_variant(variant):
    """'C/c/step' -> chunk_size C; sets the chunked module's sub-chunk and step size (read when a call is traced)."""
    chunk, sub_chunk, step_tokens = (int(x) for x in variant.split("/"))
    chunked_module.SUB_CHUNK, chunked_module.STEP_TOKENS = sub_chunk, step_tokens
    return chunk


def check_against_reference():
    """Max relative error of the chunked path against the dense form, on this device. Returns printable rows."""
    rows = []
    key = jax.random.PRNGKey(7)
    B, T, H, Hkv, dk, dv, m = 2, 777, 4, 2, 64, 32, 16
    kq, kk, kv, kg = jax.random.split(key, 4)
    q = jax.random.normal(kq, (B, T, H, dk))
    k = jax.random.normal(kk, (B, T, Hkv, dk))
    v = jax.random.normal(kv, (B, T, Hkv, dv))
    gentle = jax.nn.log_sigmoid(3 * jax.random.normal(kg, (B, T, Hkv, m)) + 1) / 2
    strong = -40.0 * jax.random.uniform(kg, (B, T, Hkv, m))
    segments = jnp.stack([(jnp.arange(T) >= 300).astype(jnp.int32) + (jnp.arange(T) >= 500), jnp.zeros(T, jnp.int32)])
    rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
    for gates_name, la in (("gentle", gentle), ("strong", strong)):
        for window in (0, 5, 64):
            kw = dict(window=window, segment_ids=segments)
            with jax.default_matmul_precision("highest"):
                ref = jax.jit(lambda *x: nha_attention(*x, impl="naive", **kw))(q, k, v, la)
                out = jax.jit(lambda *x: nha_attention(*x, impl="chunked", **kw))(q, k, v, la)
            rows.append(("f32 highest", gates_name, window, f"{rel(out, ref):.2e}"))
            bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
            out16 = jax.jit(lambda *x: nha_attention(*x, impl="chunked", **kw))(*bf, la)
            l2 = float(jnp.linalg.norm(out16.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            rows.append(("bf16 (rel L2)", gates_name, window, f"{l2:.2e}"))
            print(*rows[-2], "|", *rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--variants", default=None,
                        help="comma-separated C/c/step triples; the default is the shipped configuration")
    parser.add_argument("--check", action="store_true", help="first check accuracy against the dense form")
    args = parser.parse_args()
    default_variant = f"64/{chunked_module.SUB_CHUNK}/{chunked_module.STEP_TOKENS}"
    variants = (args.variants or default_variant).split(",")
    print(f"# {datetime.date.today()} {jax.devices()[0].device_kind} jax {jax.__version__}")
    check_rows = check_against_reference() if args.check else []
    rows = []
    for name, (B, T) in {"S1": (8, 2048), "S2": (2, 8192)}.items():
        q, k, v, la, ct = make_inputs(jax.random.PRNGKey(0), B, T)
        candidates = {f"chunked C/c/step={variant}": variant for variant in variants}
        candidates["cudnn causal"] = softmax_attention("cudnn")
        candidates["xla causal (dense)"] = softmax_attention("xla")
        for label, candidate in candidates.items():
            fn = chunked(use_variant(candidate)) if isinstance(candidate, str) else candidate
            try:
                fwd = median_ms(jax.jit(fn), (q, k, v, la), args.reps)
                fwd_bwd = median_ms(forward_and_backward(fn), (q, k, v, la, ct), args.reps)
                rows.append((name, label, f"{fwd:.2f}", f"{fwd_bwd:.2f}"))
            except Exception as e:  # noqa: BLE001 - a baseline that cannot run at this size is reported, not fatal
                rows.append((name, label, "failed", type(e).__name__ + ": " + str(e).splitlines()[0][:60]))
            print(*rows[-1], flush=True)

    mem_rows = []
    chunk = use_variant(variants[0])
    for T in (2048, 4096, 8192, 16384, 32768):
        q, k, v, la, ct = make_inputs(jax.random.PRNGKey(1), 1, T)
        nha = compiled_bytes(forward_and_backward(chunked(chunk)), q, k, v, la, ct) / 2**20
        try:
            dense = f"{compiled_bytes(forward_and_backward(softmax_attention('xla')), q, k, v, la, ct) / 2**20:.0f}"
        except Exception as e:  # noqa: BLE001 - XLA cannot even compile dense attention this long on one GPU
            dense = "compile fails: " + str(e).splitlines()[0][:50]
        mem_rows.append((T, f"{nha:.0f}", dense))
        print(*mem_rows[-1], flush=True)

    if check_rows:
        print("\n| precision | gates | W | error vs dense (f32: max rel, bf16: rel L2) |\n|---|---|---|---|")
        for row in check_rows:
            print("| " + " | ".join(map(str, row)) + " |")
    print("\n| shape | implementation | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    print(f"\n| T (B=1) | chunked {variants[0]} fwd+bwd MiB | dense XLA fwd+bwd MiB |\n|---|---|---|")
    for row in mem_rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
