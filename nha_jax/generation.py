"""Text generation with the constant-size NHA cache: prefill a batch of prompts, then decode one token at a time.

Every layer keeps its own cache (NHA_SPEC section 4):
  - an NHA layer (window W smaller than the train length, or W = 0) keeps an ops.NHAState: m slots plus a ring of
    the last W tokens, a size independent of how long the context grows;
  - a full layer (window >= the train length: the layer attended to everything in training) keeps an ordinary
    KVCache preallocated to the longest context of the call, and attends to the whole context, also past the
    train length (its train-time window was "everything", not a number of tokens).
Prompts of different lengths are left-padded: padding is its own segment (id 0) and the prompt another (id 1), so
nothing of the padding reaches the caches, and positions start at 0 at each prompt's first token.

    result = generate(model, [[1, 5, 9], [1, 7]], seq_len=config.seq_len, max_new_tokens=32, eos_id=2)
    result.tokens  # [B, 32] int32, pad_id after each row's EOS; result.lengths [B]
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nha_jax import ops
from nha_jax.model import LanguageModel
from nha_jax.ops.rope import apply_rope

PAD_SEGMENT, PROMPT_SEGMENT = 0, 1


class KVCache(NamedTuple):
    """The cache of a full layer: every token of the context, preallocated to the longest context L.

    k:     [B, L, Hkv, dk] keys, already rotated by RoPE at their positions (so a step rotates one key, not L).
    v:     [B, L, Hkv, dv] values.
    valid: [B, L] bool, entries that hold a prompt or generated token (not padding, not yet written).
    """
    k: jax.Array
    v: jax.Array
    valid: jax.Array


class DecodeState(NamedTuple):
    """What the decode loop carries between tokens.

    layers:   one NHAState or KVCache per layer.
    position: [B] int32, the RoPE position of the next token of each row.
    index:    [] int32, the KVCache entry the next token is written to (the same for every row: left padding).
    """
    layers: tuple
    position: jax.Array
    index: jax.Array


class GenerationResult(NamedTuple):
    """tokens [B, max_new_tokens] int32 (EOS included, pad_id after it); lengths [B] int32, tokens up to and
    including EOS (max_new_tokens for a row that never produced it)."""
    tokens: np.ndarray
    lengths: np.ndarray


def full_layers(model: LanguageModel, seq_len: int) -> tuple[bool, ...]:
    """Which layers keep a KVCache: window >= seq_len, the train length (model.windows came from it)."""
    return tuple(window >= seq_len for window in model.windows)


def cache_bytes(state: DecodeState) -> list[int]:
    """Bytes held by each layer's cache."""
    return [sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layer)) for layer in state.layers]


def synthetic_decode_state(model: LanguageModel, *, batch: int, context: int, full: Sequence[bool],
                           max_context: int | None = None) -> DecodeState:
    """A DecodeState as if `context` tokens had been seen (every entry zero but marked valid): the shapes, and so
    the work and memory, of decoding at that context without running a prefill. For benchmarks and accounting.

    KVCaches are allocated to max_context (default context + 1) entries, NHA layers to their window.
    """
    max_context = max_context or context + 1
    dtype = model.dtype
    layers = []
    for block, is_full in zip(model.blocks, full):
        attn = block.attn
        if is_full:
            kv = lambda width: jnp.zeros((batch, max_context, attn.num_kv_heads, width), dtype)
            layers.append(KVCache(k=kv(attn.head_dim), v=kv(attn.v_head_dim),
                                  valid=jnp.broadcast_to(jnp.arange(max_context) < context, (batch, max_context))))
        else:
            state = ops.init_state(batch, attn.num_kv_heads, attn.num_slots, attn.head_dim, attn.v_head_dim,
                                   attn.window, dtype)
            ring_pos = context - attn.window + jnp.arange(attn.window, dtype=jnp.int32)
            layers.append(state._replace(ring_pos=jnp.broadcast_to(jnp.where(ring_pos >= 0, ring_pos, -1),
                                                                   (batch, attn.window)),
                                         segment=jnp.zeros((batch,), jnp.int32),
                                         position=jnp.full((batch,), context, jnp.int32)))
    return DecodeState(layers=tuple(layers), position=jnp.full((batch,), context, jnp.int32),
                       index=jnp.asarray(context, jnp.int32))


def _full_attention_step(cache: KVCache, q: jax.Array, k_rot: jax.Array, v: jax.Array, index: jax.Array,
                         num_slots: int) -> tuple[jax.Array, KVCache]:
    """One token of a full layer: write (k_rot, v) at `index`, attend to every valid entry plus the layer's m
    zero sinks (the empty slots of NHA_SPEC section 1: logit 0, value 0).

    q [B, H, dk] rotated, k_rot [B, Hkv, dk], v [B, Hkv, dv] -> (out [B, H, dv] float32, cache).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_rot.shape[1]
    write = lambda buffer, x: jax.lax.dynamic_update_slice_in_dim(buffer, x[:, None].astype(buffer.dtype), index, 1)
    cache = KVCache(k=write(cache.k, k_rot), v=write(cache.v, v),
                    valid=jax.lax.dynamic_update_slice_in_dim(cache.valid, jnp.ones((batch, 1), bool), index, 1))
    qg = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).astype(cache.k.dtype)
    logits = jnp.einsum("bhgd,blhd->bhgl", qg, cache.k, preferred_element_type=jnp.float32) * head_dim ** -0.5
    logits = jnp.where(cache.valid[:, None, None, :], logits, -jnp.inf)
    sinks = jnp.zeros(logits.shape[:-1] + (num_slots,), jnp.float32)
    probs = jax.nn.softmax(jnp.concatenate([sinks, logits], axis=-1), axis=-1)[..., num_slots:]
    out = jnp.einsum("bhgl,blhe->bhge", probs.astype(cache.v.dtype), cache.v, preferred_element_type=jnp.float32)
    return out.reshape(batch, num_heads, -1), cache


def prefill(model: LanguageModel, tokens: jax.Array, prompt_mask: jax.Array | None, *, full: Sequence[bool],
            max_context: int) -> tuple[jax.Array, DecodeState]:
    """Runs left-padded prompts through the model with the chunked/Pallas operator and builds every layer's cache.

    Args:
      tokens: [B, T] int, prompts right-aligned (left padding).
      prompt_mask: [B, T] bool, True on prompt tokens (a suffix of each row, at least one token); None when every
        row is all prompt (no segment ids then: the operator may take its fastest path, e.g. cuDNN attention).
      full: per layer, whether it keeps a KVCache (see full_layers).
      max_context: T plus the tokens to be generated: the length every KVCache is allocated to.
    Returns:
      (logits of each row's last prompt token [B, V] float32, DecodeState).
    """
    batch, seq = tokens.shape
    if prompt_mask is None:
        segment_ids = None
        prompt_mask = jnp.ones((batch, seq), bool)
    else:
        segment_ids = jnp.where(prompt_mask, PROMPT_SEGMENT, PAD_SEGMENT).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1, dtype=jnp.int32) - 1, 0)
    h = model.embed[...].astype(model.dtype)[tokens]
    caches = []
    for block, is_full in zip(model.blocks, full):
        attn = block.attn
        q, k, v, log_alpha = attn.project(block.attn_norm(h))
        if is_full:
            out = ops.nha_attention(q, k, v, log_alpha, window=seq, rope_theta=attn.rope_theta,
                                    segment_ids=segment_ids, impl=attn.impl, chunk_size=attn.chunk_size)
            padding = [(0, 0), (0, max_context - seq), (0, 0), (0, 0)]
            k_rot = apply_rope(k, positions, attn.rope_theta).astype(k.dtype)
            caches.append(KVCache(k=jnp.pad(k_rot, padding), v=jnp.pad(v, padding),
                                  valid=jnp.pad(prompt_mask, [(0, 0), (0, max_context - seq)])))
        else:
            out, state = ops.prefill(q, k, v, log_alpha, window=attn.window, rope_theta=attn.rope_theta,
                                     segment_ids=segment_ids, impl=attn.impl, chunk_size=attn.chunk_size)
            caches.append(state)
        h = h + attn.output(out)
        h = h + block.mlp(block.mlp_norm(h))
    state = DecodeState(layers=tuple(caches), position=positions[:, -1] + 1, index=jnp.asarray(seq, jnp.int32))
    return model.logits(model.final_norm(h[:, -1])), state


def decode_step(model: LanguageModel, state: DecodeState, tokens: jax.Array) -> tuple[jax.Array, DecodeState]:
    """Feeds one token per row: tokens [B] int -> (next-token logits [B, V] float32, DecodeState)."""
    h = model.embed[...].astype(model.dtype)[tokens][:, None]
    caches = []
    for block, cache in zip(model.blocks, state.layers):
        attn = block.attn
        q, k, v, log_alpha = (x[:, 0] for x in attn.project(block.attn_norm(h)))
        if isinstance(cache, KVCache):
            q_rot = apply_rope(q, state.position, attn.rope_theta)
            k_rot = apply_rope(k, state.position, attn.rope_theta)
            out, cache = _full_attention_step(cache, q_rot, k_rot, v, state.index, attn.num_slots)
            out = out.astype(q.dtype)
        else:
            out, cache = ops.decode_step(cache, q, k, v, log_alpha, rope_theta=attn.rope_theta)
        caches.append(cache)
        h = h + attn.output(out[:, None])
        h = h + block.mlp(block.mlp_norm(h))
    state = DecodeState(layers=tuple(caches), position=state.position + 1, index=state.index + 1)
    return model.logits(model.final_norm(h[:, 0])), state


def sample(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Next tokens [B] int32 from logits [B, V]: greedy when temperature == 0, else softmax(logits / temperature)
    restricted to the top_k most likely tokens (0 = all) and to the smallest set whose mass reaches top_p."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The least likely token still needed to reach top_p; everything below it is cut.
        cutoff = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "full", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate_jit(graphdef, params, tokens, prompt_mask, key, eos_id, pad_id, *, full, max_new_tokens, temperature,
                  top_k, top_p):
    model = nnx.merge(graphdef, params)
    logits, state = prefill(model, tokens, prompt_mask, full=full, max_context=tokens.shape[1] + max_new_tokens)
    batch = tokens.shape[0]
    choose = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

    def keep_going(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_token(carry):
        step, state, logits, output, lengths, done, key = carry
        key, draw = jax.random.split(key)
        token = jnp.where(done, pad_id, choose(logits, draw))
        output = output.at[:, step].set(token)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | (token == eos_id)
        logits, state = decode_step(model, state, token)
        return step + 1, state, logits, output, lengths, done, key

    carry = (jnp.zeros((), jnp.int32), state, logits, jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
             jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool), key)
    _, _, _, output, lengths, _, _ = jax.lax.while_loop(keep_going, one_token, carry)
    return output, lengths


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to one length: -> (tokens [B, T] int32, prompt_mask [B, T] bool)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists; start an empty prompt with "
                         "the tokenizer's BOS token.")
    length = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = True
    return tokens, mask


def generate(model: LanguageModel, prompts: Sequence[Sequence[int]], *, seq_len: int, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
             pad_id: int = 0, seed: int = 0) -> GenerationResult:
    """Continues each prompt by up to max_new_tokens tokens (one jitted program: prefill + decode loop).

    Args:
      model: a LanguageModel; seq_len: its train length (layers with window >= seq_len are full layers).
      prompts: B token lists of any lengths >= 1.
      max_new_tokens: tokens to generate per row (the loop stops early once every row has produced eos_id).
      temperature: 0 = greedy; top_k: 0 = no cut; top_p: 1.0 = no cut.
      eos_id: the token that ends a row (None: rows run to max_new_tokens); pad_id fills the rest of the row.
      seed: the sampling key.
    Returns:
      GenerationResult(tokens [B, max_new_tokens], lengths [B]).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got temperature={temperature}, "
                         f"top_k={top_k}, top_p={top_p}.")
    tokens, mask = pad_prompts(prompts, pad_id)
    graphdef, params = nnx.split(model)
    output, lengths = _generate_jit(
        graphdef, params, jnp.asarray(tokens), None if mask.all() else jnp.asarray(mask), jax.random.PRNGKey(seed),
        jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32), jnp.asarray(pad_id, jnp.int32),
        full=full_layers(model, seq_len), max_new_tokens=max_new_tokens, temperature=float(temperature),
        top_k=int(top_k), top_p=float(top_p))
    return GenerationResult(tokens=np.asarray(output), lengths=np.asarray(lengths))
