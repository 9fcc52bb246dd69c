"""Rotary position embedding, rotate-half convention (as in Llama / GPT-NeoX)."""
import jax.numpy as jnp


def apply_rope(x, positions, theta):
    """Rotates the last axis of `x` by its token positions.

    Args:
      x: [*P, *heads, d] with d even; P = positions.shape (e.g. [B, T] or [B, W] or [B]).
      positions: int [*P], the position of each token.
      theta: RoPE base (e.g. 10000.0).
    Returns:
      float32 array shaped like x.
    """
    d = x.shape[-1]
    half = d // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [*P, d/2]
    angles = angles.reshape(angles.shape[:-1] + (1,) * (x.ndim - positions.ndim - 1) + (half,))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x = x.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
