"""The constant-size NHA cache and the one-token decode step (NHA_SPEC section 4).

The step is also the recurrent oracle: `impl="recurrent"` is a lax.scan of `decode_step` over time.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nha_jax.ops.rope import apply_rope

# Segment id of a state that has seen no token; real segment ids are never this value.
NO_SEGMENT = jnp.iinfo(jnp.int32).min


class NHAState(NamedTuple):
    """Everything NHA needs to continue a sequence, of a size independent of its length.

    slot_k:         [B, Hkv, m, dk] float32, the slot keys K~.
    slot_v:         [B, Hkv, m, dv] float32, the slot values V~.
    ring_k:         [B, W, Hkv, dk], the last W keys, un-rotated, oldest first (right-aligned).
    ring_v:         [B, W, Hkv, dv], their values.
    ring_log_alpha: [B, W, Hkv, m] float32, their gates, applied when they leave the window for the slots.
    ring_pos:       [B, W] int32, their RoPE positions; -1 marks an empty entry.
    segment:        [B] int32, the segment id of the last token seen (NO_SEGMENT for a fresh state).
    position:       [B] int32, the position the next token of that segment gets.
    """
    slot_k: jax.Array
    slot_v: jax.Array
    ring_k: jax.Array
    ring_v: jax.Array
    ring_log_alpha: jax.Array
    ring_pos: jax.Array
    segment: jax.Array
    position: jax.Array

    @property
    def window(self):
        return self.ring_k.shape[1]


def init_state(batch, num_kv_heads, num_slots, head_dim_k, head_dim_v, window, dtype=jnp.float32):
    """An empty NHAState (no token seen). `dtype` is the storage type of the window's keys and values."""
    return NHAState(
        slot_k=jnp.zeros((batch, num_kv_heads, num_slots, head_dim_k), jnp.float32),
        slot_v=jnp.zeros((batch, num_kv_heads, num_slots, head_dim_v), jnp.float32),
        ring_k=jnp.zeros((batch, window, num_kv_heads, head_dim_k), dtype),
        ring_v=jnp.zeros((batch, window, num_kv_heads, head_dim_v), dtype),
        ring_log_alpha=jnp.zeros((batch, window, num_kv_heads, num_slots), jnp.float32),
        ring_pos=jnp.full((batch, window), -1, jnp.int32),
        segment=jnp.full((batch,), NO_SEGMENT, jnp.int32),
        position=jnp.zeros((batch,), jnp.int32),
    )


def _write_slots(slot_k, slot_v, k, v, log_alpha, mask):
    """K~ <- alpha K~ + (1 - alpha) k, same for V~, where mask [B] is set. k [B,Hkv,dk], log_alpha [B,Hkv,m]."""
    alpha = jnp.exp(log_alpha)[..., None]
    write = -jnp.expm1(log_alpha)[..., None]  # 1 - alpha, exact for alpha near 1
    new_k = alpha * slot_k + write * k.astype(jnp.float32)[:, :, None, :]
    new_v = alpha * slot_v + write * v.astype(jnp.float32)[:, :, None, :]
    mask = mask[:, None, None, None]
    return jnp.where(mask, new_k, slot_k), jnp.where(mask, new_v, slot_v)


def _push(ring, x):
    """ring [B, W, ...] shifted one entry older, x [B, ...] as the newest: [ring[:, 1:], x].

    Written as pad + select, not concatenate: at batch 1 XLA:GPU ran the concatenate of these small rings as a
    ~0.3 ms kernel, three per layer and token (docs/RESULTS.md, batch 1).
    """
    newest = (jnp.arange(ring.shape[1]) == ring.shape[1] - 1).reshape((1, -1) + (1,) * (ring.ndim - 2))
    older = jnp.pad(ring[:, 1:], [(0, 0), (0, 1)] + [(0, 0)] * (ring.ndim - 2))
    return jnp.where(newest, x[:, None].astype(ring.dtype), older)


def decode_step(state, q, k, v, log_alpha, *, scale=None, rope_theta=10000.0, segment_id=None):
    """Advances the cache by one token and returns that token's attention output.

    Args:
      state: NHAState with window W = state.ring_k.shape[1].
      q: [B, H, dk]; k: [B, Hkv, dk]; v: [B, Hkv, dv]; log_alpha: [B, Hkv, m] (<= 0).
      scale: logit scale, default dk ** -0.5.
      rope_theta: RoPE base for the window logits; None disables RoPE.
      segment_id: int [B] or None. A token whose id differs from state.segment starts a new segment: the slots and
        the window restart and its position is 0. None continues the current segment.
    Returns:
      (out [B, H, dv] in q.dtype, new NHAState).
    """
    B, H, dk = q.shape
    Hkv, m = log_alpha.shape[1], log_alpha.shape[2]
    W = state.window
    scale = dk ** -0.5 if scale is None else scale

    if segment_id is not None:
        segment_id = jnp.asarray(segment_id, jnp.int32)
        same = segment_id == state.segment
        state = state._replace(
            slot_k=jnp.where(same[:, None, None, None], state.slot_k, 0.0),
            slot_v=jnp.where(same[:, None, None, None], state.slot_v, 0.0),
            ring_pos=jnp.where(same[:, None], state.ring_pos, -1),
            segment=segment_id,
            position=jnp.where(same, state.position, 0),
        )
    log_alpha = log_alpha.astype(jnp.float32)

    if W > 0:
        # The oldest window entry is token t - W when the window is full: it moves into the slots now.
        slot_k, slot_v = _write_slots(state.slot_k, state.slot_v, state.ring_k[:, 0], state.ring_v[:, 0],
                                      state.ring_log_alpha[:, 0], state.ring_pos[:, 0] >= 0)
        state = state._replace(
            slot_k=slot_k, slot_v=slot_v,
            ring_k=_push(state.ring_k, k), ring_v=_push(state.ring_v, v),
            ring_log_alpha=_push(state.ring_log_alpha, log_alpha),
            ring_pos=_push(state.ring_pos, state.position))
    else:
        slot_k, slot_v = _write_slots(state.slot_k, state.slot_v, k, v, log_alpha, jnp.ones((B,), bool))
        state = state._replace(slot_k=slot_k, slot_v=slot_v)

    qg = q.astype(jnp.float32).reshape(B, Hkv, H // Hkv, dk)
    slot_logits = scale * jnp.einsum("bhgd,bhid->bhgi", qg, state.slot_k)
    logits = [slot_logits]
    if W > 0:
        q_rot, k_rot = qg, state.ring_k.astype(jnp.float32)
        if rope_theta is not None:
            q_rot = apply_rope(qg, state.position, rope_theta)
            k_rot = apply_rope(k_rot, state.ring_pos, rope_theta)
        window_logits = scale * jnp.einsum("bhgd,bwhd->bhgw", q_rot, k_rot)
        logits.append(jnp.where((state.ring_pos >= 0)[:, None, None, :], window_logits, -jnp.inf))
    p = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    out = jnp.einsum("bhgi,bhie->bhge", p[..., :m], state.slot_v)
    if W > 0:
        out = out + jnp.einsum("bhgw,bwhe->bhge", p[..., m:], state.ring_v.astype(jnp.float32))
    state = state._replace(position=state.position + 1)
    return out.reshape(B, H, -1).astype(q.dtype), state
