"""Rotary position embedding, rotate-half convention (as in Llama / GPT-NeoX)."""
import jax.numpy as jnp


def rope_frequencies(head_dim, rope):
    """The d/2 inverse frequencies of RoPE: `rope` is a base theta (theta ** (-2i / d)), or the d/2 frequencies
    themselves as a tuple (for scaled variants such as Llama-3's)."""
    if isinstance(rope, tuple):
        return jnp.asarray(rope, jnp.float32)
    half = head_dim // 2
    return rope ** (-jnp.arange(half, dtype=jnp.float32) / half)


def apply_rope(x, positions, rope):
    """Rotates the last axis of `x` by its token positions.

    Args:
      x: [*P, *heads, d] with d even; P = positions.shape (e.g. [B, T] or [B, W] or [B]).
      positions: int [*P], the position of each token.
      rope: RoPE base theta (e.g. 10000.0) or a tuple of d/2 inverse frequencies (see rope_frequencies).
    Returns:
      float32 array shaped like x.
    """
    half = x.shape[-1] // 2
    inv_freq = rope_frequencies(x.shape[-1], rope)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [*P, d/2]
    angles = angles.reshape(angles.shape[:-1] + (1,) * (x.ndim - positions.ndim - 1) + (half,))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x = x.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
