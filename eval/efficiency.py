"""Efficiency: prefill time, per-token decode latency and decode-cache memory versus context length, for a model and
a Transformer++ of the same shape (no slots, every layer full), the latter with random weights (speed only).

Decode is timed as a jitted loop of `decode_steps` tokens (as generation runs it) from a cache holding `context`
tokens; prefill as one jitted call on `context` random tokens. bench/bench_decode.py runs the same on the GPU.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from eval.progress import progress
from nha_jax import generation
from nha_jax.model import LanguageModel


def transformer_counterpart(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same shape as a Transformer++: no slots, every layer full (window = the sequence length)."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.update(num_slots=0, windows=(), block_size=1, full_idx=0)
    return cfg


def _timed(fn, *args, repeats: int) -> float:
    """Best wall time of fn(*args) over `repeats` calls after one warm-up (compilation) call, in seconds."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def decode_loop(graphdef, decode_steps: int):
    """jitted (params, cache, token [B]) -> (cache, last token [B]): `decode_steps` greedy steps, as generation runs
    them (graphdef from nnx.split of the model)."""
    @jax.jit
    def run_decode(params, state, token):
        def step(_, carry):
            state, token = carry
            logits, state = generation.decode_step(nnx.merge(graphdef, params), state, token)
            return state, jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.lax.fori_loop(0, decode_steps, step, (state, token))
    return run_decode


def measure(model: LanguageModel, *, train_len: int, contexts, batch: int = 1, decode_steps: int = 16,
            repeats: int = 3, prefill: bool = True, seed: int = 0) -> dict:
    """{context: {"prefill_s", "decode_ms_per_token", "cache_bytes", "nha_cache_bytes", "kv_cache_bytes"}}.

    prefill=False skips the prefill timing (the decode cache then comes from generation.synthetic_decode_state,
    which has the same shapes and work): long contexts on a slow backend.
    """
    full = generation.full_layers(model, train_len)
    graphdef, params = nnx.split(model)
    vocab = model.embed.shape[0]

    @jax.jit
    def run_prefill(params, tokens):
        return generation.prefill(nnx.merge(graphdef, params), tokens, None, full=full,
                                  max_context=tokens.shape[1] + decode_steps)

    run_decode = decode_loop(graphdef, decode_steps)

    results = {}
    rng = np.random.default_rng(seed)
    for context in progress(contexts, desc="efficiency", unit="context"):
        row = {}
        if prefill:
            tokens = jnp.asarray(rng.integers(0, vocab, size=(batch, context)), jnp.int32)
            row["prefill_s"] = _timed(run_prefill, params, tokens, repeats=repeats)
            state = run_prefill(params, tokens)[1]
        else:
            state = generation.synthetic_decode_state(model, batch=batch, context=context, full=full,
                                                      max_context=context + decode_steps)
        token = jnp.zeros((batch,), jnp.int32)
        # Each timed call starts from the same cache: decode's work grows only with the context it reads.
        seconds = _timed(lambda p, s, t: run_decode(p, s, t)[1], params, state, token, repeats=repeats)
        sizes = generation.cache_bytes(state)
        row.update(decode_ms_per_token=1000 * seconds / decode_steps, cache_bytes=sum(sizes),
                   nha_cache_bytes=sum(b for b, f in zip(sizes, full) if not f),
                   kv_cache_bytes=sum(b for b, f in zip(sizes, full) if f))
        results[context] = row
    return results


def run(loaded, *, contexts=None, batch: int = 1, decode_steps: int = 16, repeats: int = 3) -> dict:
    """The checkpoint's model and its Transformer++ counterpart at contexts (default: train length x 1, 2, 4):
    {"nha": {context: row}, "transformer": {context: row}} (keys as strings, JSON-ready)."""
    config = loaded.config
    contexts = contexts or [config.seq_len * f for f in (1, 2, 4)]
    baseline = LanguageModel(transformer_counterpart(config.model), seq_len=config.seq_len,
                             rngs=nnx.Rngs(params=jax.random.PRNGKey(0)))
    results = {}
    for name, model in (("nha", loaded.model), ("transformer", baseline)):
        rows = measure(model, train_len=config.seq_len, contexts=contexts, batch=batch, decode_steps=decode_steps,
                       repeats=repeats)
        results[name] = {str(context): row for context, row in rows.items()}
    return results


def table(results: dict) -> str:
    lines = ["| model | context | prefill s | decode ms/token | cache MiB (NHA layers + KV) |", "|---|---|---|---|---|"]
    for name, rows in results.items():
        for context, r in rows.items():
            prefill = f"{r['prefill_s']:.4f}" if "prefill_s" in r else "-"
            lines.append(f"| {name} | {context} | {prefill} | {r['decode_ms_per_token']:.3f} | "
                         f"{r['cache_bytes'] / 2**20:.3f} ({r['nha_cache_bytes'] / 2**20:.3f} + "
                         f"{r['kv_cache_bytes'] / 2**20:.3f}) |")
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    """Two panels: decode ms/token and cache MiB versus context, one line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        contexts = [int(c) for c in rows]
        latency.plot(contexts, [r["decode_ms_per_token"] for r in rows.values()], marker="o", label=name)
        memory.plot(contexts, [r["cache_bytes"] / 2**20 for r in rows.values()], marker="o", label=name)
    for axes, label in ((latency, "decode ms / token"), (memory, "decode cache MiB")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("context (tokens)")
        axes.set_ylabel(label)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
