"""RoPE for the kernels' launchers (rotate-half convention). pallas_kernels does not import nha_jax, so this is the
kernels' own copy of nha_jax.ops.rope; tests hold the two to the same results."""
import jax.numpy as jnp


def rope(x, positions, theta):
    """x [B, T, heads, d], positions int [B, T]; theta a base or a tuple of the d/2 inverse frequencies (scaled
    RoPE) -> float32 [B, T, heads, d]."""
    half = x.shape[-1] // 2
    inv_freq = jnp.asarray(theta, jnp.float32) if isinstance(theta, tuple) else theta ** (
        -jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
