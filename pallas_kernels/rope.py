"""RoPE for the kernels' launchers (rotate-half convention). pallas_kernels does not import nha_jax, so this is the
kernels' own copy of nha_jax.ops.rope; tests hold the two to the same results.

The GPU kernels rotate the queries themselves (pallas_kernels.triton._rotated) from per-column frequencies
(`rope_frequencies`); `rope_transpose` takes the window branch's query gradient back through that rotation."""
import jax.numpy as jnp


def rope(x, positions, theta):
    """x [B, T, heads, d], positions int [B, T]; theta a base or a tuple of the d/2 inverse frequencies (scaled
    RoPE) -> float32 [B, T, heads, d]."""
    half = x.shape[-1] // 2
    inv_freq = _inverse_frequencies(theta, half)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _inverse_frequencies(theta, half):
    return jnp.asarray(theta, jnp.float32) if isinstance(theta, tuple) else theta ** (
        -jnp.arange(half, dtype=jnp.float32) / half)


def rope_frequencies(theta, d, d_pad):
    """Per-column inverse frequencies [d_pad] float32 of a d-wide head padded to d_pad: columns i and i + d/2 share
    one, padding columns get 0 (no rotation); theta as `rope`, None: all 0."""
    if theta is None:
        return jnp.zeros((d_pad,), jnp.float32)
    inv_freq = _inverse_frequencies(theta, d // 2)
    return jnp.concatenate([inv_freq, inv_freq, jnp.zeros((d_pad - d,), jnp.float32)])


def rotation_signs(d_pad, half):
    """[d_pad] float32: -1 on the first half of the rotated columns, +1 on the second, 0 on padding columns."""
    column = jnp.arange(d_pad)
    return jnp.where(column < half, -1.0, jnp.where(column < 2 * half, 1.0, 0.0)).astype(jnp.float32)


def swap_halves(x, half):
    """x [..., d_pad] with columns [0, half) and [half, 2 half) exchanged (padding columns in place)."""
    return jnp.concatenate([x[..., half:2 * half], x[..., :half], x[..., 2 * half:]], axis=-1)


def rope_transpose(g, positions, freqs, half):
    """The gradient through RoPE x -> x cos + swap_halves(x) sin * signs (what `rope` and the kernels compute):
    g [B, T, heads, d_pad] with respect to the rotated rows, positions int [B, T], freqs [d_pad]
    (`rope_frequencies`), half = d / 2 -> float32 [B, T, heads, d_pad] with respect to the unrotated ones."""
    angles = positions.astype(jnp.float32)[:, :, None, None] * freqs
    g = g.astype(jnp.float32)
    return g * jnp.cos(angles) + swap_halves(g * jnp.sin(angles) * rotation_signs(g.shape[-1], half), half)
