"""Per-token decode latency and decode-cache memory versus context: NHA against a Transformer++ of the same shape.

    python bench/bench_decode.py [--config configs/nha_340m.py] [--contexts 2048,8192,32768,65536]
                                 [--batch 8] [--decode-steps 32] [--repeats 5] [--json out.json] [--plot out.png]

The NHA model is the config's; the Transformer++ is the same config with no slots and every layer full
(eval.efficiency.transformer_counterpart). Weights are random (speed does not depend on them). The cache holding
`context` tokens is built directly (nha_jax.generation.synthetic_decode_state: the shapes, and so the work and the
bytes, of a real prefill of that length), then a jitted loop of --decode-steps tokens is timed as generation runs it.
Targets (issue 6): NHA latency flat within 1.2x from 2K to 64K; at 32K NHA >= 3x faster than Transformer++ with
>= 8x less cache memory.
"""
import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "nha_340m.py"))
    parser.add_argument("--contexts", default="2048,4096,8192,16384,32768,65536")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="nha,transformer")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--plot", default=None, help="also plot latency and cache memory versus context (PNG)")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. model.num_layers=4")
    parser.add_argument("--profile", action="store_true",
                        help="also print each model's device time per kernel of one decode loop at the first context")
    args = parser.parse_args(argv)

    import jax
    from flax import nnx

    from eval.efficiency import measure, transformer_counterpart
    from nha_jax.model import LanguageModel
    from nha_jax.training import apply_overrides, load_config_file
    from nha_jax.training.loop import resolve_vocab_size
    from nha_jax.training.state import count_params

    config = apply_overrides(load_config_file(args.config), args.set)
    resolve_vocab_size(config)
    contexts = [int(c) for c in args.contexts.split(",")]
    model_cfgs = {"nha": config.model, "transformer": transformer_counterpart(config.model)}
    print(f"device {jax.devices()[0].device_kind}, batch {args.batch}, {args.decode_steps} tokens per timed loop, "
          f"best of {args.repeats}", flush=True)
    rows = []
    for name in args.models.split(","):
        start = time.perf_counter()
        model = LanguageModel(model_cfgs[name], seq_len=config.seq_len, rngs=nnx.Rngs(params=jax.random.PRNGKey(0)))
        params = count_params(nnx.state(model, nnx.Param))
        results = measure(model, train_len=config.seq_len, contexts=contexts, batch=args.batch,
                          decode_steps=args.decode_steps, repeats=args.repeats, prefill=False)
        for context, r in results.items():
            rows.append({"model": name, "params_m": params / 1e6, "context": context, **r})
            print(f"{name:12s} {context:6d}: {r['decode_ms_per_token']:.3f} ms/token, "
                  f"cache {r['cache_bytes'] / 2**20:.1f} MiB", flush=True)
        print(f"{name}: {time.perf_counter() - start:.0f} s including compilation", flush=True)
        if args.profile:
            profile_decode(name, model, config.seq_len, contexts[0], args.batch, args.decode_steps)
        del model

    by = {(r["model"], r["context"]): r for r in rows}
    print("\n| model | params | context | decode ms/token (batch %d) | tokens/s | cache MiB | vs Transformer++ |"
          % args.batch)
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = by.get(("transformer", r["context"]))
        ratio = (f"{base['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x faster, "
                 f"{base['cache_bytes'] / r['cache_bytes']:.1f}x less memory" if base and r["model"] != "transformer"
                 else "")
        print(f"| {r['model']} | {r['params_m']:.0f}M | {r['context']} | {r['decode_ms_per_token']:.3f} | "
              f"{1000 * args.batch / r['decode_ms_per_token']:.0f} | {r['cache_bytes'] / 2**20:.1f} | {ratio} |")
    nha = [by[("nha", c)]["decode_ms_per_token"] for c in contexts if ("nha", c) in by]
    if len(nha) > 1:
        print(f"\nNHA latency, longest / shortest context: {nha[-1] / nha[0]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.plot:
        from eval.efficiency import plot
        plot(rows_by_model(rows), args.plot)


def rows_by_model(rows):
    """The benchmark's rows as eval.efficiency.plot takes them: {model: {context: row}}."""
    results = {}
    for r in rows:
        results.setdefault(r["model"], {})[r["context"]] = r
    return results


def profile_decode(name, model, train_len, context, batch, decode_steps):
    """Prints the device time per kernel of one jitted loop of decode_steps tokens from a `context`-token cache."""
    import jax.numpy as jnp
    from flax import nnx

    from bench.common import kernel_table, print_kernel_table
    from eval.efficiency import decode_loop
    from nha_jax import generation

    full = generation.full_layers(model, train_len)
    state = generation.synthetic_decode_state(model, batch=batch, context=context, full=full,
                                              max_context=context + decode_steps)
    graphdef, params = nnx.split(model)
    rows = kernel_table(decode_loop(graphdef, decode_steps), (params, state, jnp.zeros((batch,), jnp.int32)))
    print_kernel_table(f"{name}, batch {batch}, context {context}, {decode_steps} tokens", rows)


if __name__ == "__main__":
    main(sys.argv[1:])
