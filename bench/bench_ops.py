"""Issue-2 benchmark: the chunked XLA path of nha_attention against cuDNN and XLA softmax attention, one GPU.

Times forward and forward+backward (bf16, median of many runs after warm-up) at
S1 = (B=8, T=2048) and S2 = (B=2, T=8192), H=16, dk=dv=128, m=64, W=64, for several chunk sizes, then reports the
compiled memory of the chunked forward+backward at B=1, T = 2K..32K next to dense XLA attention's.
Usage (GPU machine): python bench/bench_ops.py [--reps 20]
"""
import argparse
import datetime

import jax

from bench.common import compiled_bytes, forward_and_backward, make_inputs, median_ms
from nha_jax.ops import nha_attention

WINDOW = 64


def chunked(chunk_size):
    return lambda q, k, v, la: nha_attention(q, k, v, la, window=WINDOW, impl="chunked", chunk_size=chunk_size)


def softmax_attention(implementation):
    return lambda q, k, v, la: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--chunks", default="32,64,128")
    args = parser.parse_args()
    print(f"# {datetime.date.today()} {jax.devices()[0].device_kind} jax {jax.__version__}")
    rows = []
    for name, (B, T) in {"S1": (8, 2048), "S2": (2, 8192)}.items():
        q, k, v, la, ct = make_inputs(jax.random.PRNGKey(0), B, T)
        candidates = {f"chunked C={c}": chunked(int(c)) for c in args.chunks.split(",")}
        candidates["cudnn causal"] = softmax_attention("cudnn")
        candidates["xla causal (dense)"] = softmax_attention("xla")
        for label, fn in candidates.items():
            try:
                fwd = median_ms(jax.jit(fn), (q, k, v, la), args.reps)
                fwd_bwd = median_ms(forward_and_backward(fn), (q, k, v, la, ct), args.reps)
                rows.append((name, label, f"{fwd:.2f}", f"{fwd_bwd:.2f}"))
            except Exception as e:  # noqa: BLE001 - a baseline that cannot run at this size is reported, not fatal
                rows.append((name, label, "failed", type(e).__name__ + ": " + str(e).splitlines()[0][:60]))
            print(*rows[-1], flush=True)

    mem_rows = []
    for T in (2048, 4096, 8192, 16384, 32768):
        q, k, v, la, ct = make_inputs(jax.random.PRNGKey(1), 1, T)
        nha = compiled_bytes(forward_and_backward(chunked(64)), q, k, v, la, ct) / 2**20
        try:
            dense = f"{compiled_bytes(forward_and_backward(softmax_attention('xla')), q, k, v, la, ct) / 2**20:.0f}"
        except Exception as e:  # noqa: BLE001 - XLA cannot even compile dense attention this long on one GPU
            dense = "compile fails: " + str(e).splitlines()[0][:50]
        mem_rows.append((T, f"{nha:.0f}", dense))
        print(*mem_rows[-1], flush=True)

    print("\n| shape | implementation | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    print("\n| T (B=1) | chunked fwd+bwd MiB | dense XLA fwd+bwd MiB |\n|---|---|---|")
    for row in mem_rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
