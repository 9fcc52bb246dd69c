"""Building blocks of the NHA language model (Flax NNX): Linear, RMSNorm, SwiGLU MLP and the NHA attention layer.

Parameters are float32 and annotated with logical axis names (see nha_jax.sharding); every layer casts them to its
compute dtype at use. Activations keep the [B, T, ...] layout; attention tensors are [B, T, heads, head_dim] from
the projections straight into nha_attention.
"""
from __future__ import annotations

from typing import Sequence

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nha_jax import ops
from nha_jax.ops.rope import apply_rope
from nha_jax.sharding import constrain


def logical_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], std: float) -> nnx.Param:
    """A float32 N(0, std) parameter carrying its logical axis names (sharded later, by the trainer, not eagerly)."""
    value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ W (+ b when use_bias); W [d_in, d_out] float32, matmul in `dtype` with float32 accumulation."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, dtype, init_std: float, rngs: nnx.Rngs,
                 use_bias: bool = False):
        self.kernel = logical_param(rngs, (d_in, d_out), axes, init_std)
        self.bias = (nnx.Param(jnp.zeros((d_out,), jnp.float32), out_sharding=(axes[1],), eager_sharding=False)
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., d_in] -> [..., d_out] in self.dtype."""
        # The product comes out in self.dtype (the matmul units accumulate in float32 either way). A float32 result
        # cast down afterwards would make the backward's matmuls float32, since their cotangent is then float32:
        # on an H100 that ran every weight and input gradient as a tf32 GEMM at half the bf16 rate, for gradients
        # rounded to bf16 all the same.
        out = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            out = out + self.bias[...].astype(self.dtype)
        return out


@jax.custom_vjp
def logits_matmul(h: jax.Array, head: jax.Array) -> jax.Array:
    """h [..., D] @ head [D, V], both in the compute dtype -> logits [..., V] float32 (the loss wants float32 logits).

    The backward casts the logits' cotangent to the compute dtype first, so that its two matmuls (the largest of a
    small model's step) run at the compute dtype's rate; XLA's own transpose would run them in float32.
    """
    return jnp.dot(h, head, preferred_element_type=jnp.float32)


def _logits_matmul_fwd(h, head):
    return logits_matmul(h, head), (h, head)


def _logits_matmul_bwd(residuals, d_logits):
    h, head = residuals
    d_logits = d_logits.astype(h.dtype)
    d_h = jnp.dot(d_logits, head.T)
    d_head = jnp.einsum("...d,...v->dv", h, d_logits)
    return d_h, d_head.astype(head.dtype)


logits_matmul.defvjp(_logits_matmul_fwd, _logits_matmul_bwd)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last axis, computed in float32, returned in x.dtype."""

    def __init__(self, width: int, *, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((width,), jnp.float32), out_sharding=("norm",), eager_sharding=False)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., width] -> same shape and dtype."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...]).astype(x.dtype)


def mlp_hidden_size(d_model: int, multiple: int = 256) -> int:
    """2/3 * 4 * d_model rounded up to a multiple of `multiple` (NHA_SPEC section 1)."""
    hidden = int(2 * 4 * d_model / 3)
    return -(-hidden // multiple) * multiple


class SwiGLU(nnx.Module):
    """down(SiLU(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int, *, dtype, init_std: float, rngs: nnx.Rngs):
        self.gate = Linear(d_model, hidden, ("embed", "mlp"), dtype=dtype, init_std=init_std, rngs=rngs)
        self.up = Linear(d_model, hidden, ("embed", "mlp"), dtype=dtype, init_std=init_std, rngs=rngs)
        self.down = Linear(hidden, d_model, ("mlp", "embed"), dtype=dtype, init_std=init_std, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        hidden = jax.nn.silu(self.gate(x)) * self.up(x)
        return self.down(constrain(hidden, ("batch", "seq", "act_heads")))


def llama3_rope_frequencies(head_dim: int, theta: float, *, factor: float, low_freq_factor: float,
                            high_freq_factor: float, original_max_position: int) -> tuple[float, ...]:
    """Llama-3 RoPE scaling: the head_dim / 2 inverse frequencies of base `theta`, long wavelengths divided by
    `factor`, a smooth blend between (as Hugging Face's rope_type "llama3" computes them)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * math.pi / inv_freq
    smooth = (original_max_position / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = np.where(wavelength > original_max_position / low_freq_factor, inv_freq / factor, blended)
    scaled = np.where(wavelength < original_max_position / high_freq_factor, inv_freq, scaled)
    return tuple(float(f) for f in scaled.astype(np.float32))


class NHAAttention(nnx.Module):
    """Native Hybrid Attention layer (NHA_SPEC section 1): m gated slots + a sliding window of W tokens, one softmax.

    num_slots = 0 gives sliding-window attention (or causal softmax attention when window >= sequence length);
    window = 0 gives Gated Slot Attention. The gate and the state live per kv head (GQA).

    The LLM variant (NHA_SPEC section 5, a converted pretrained Transformer) sets value_silu=False (v = W_v x),
    output_norm=False (y = W_o o instead of W_o RMSNorm(SiLU(o))), qkv_bias=True for Qwen2-style biases, and
    rope_frequencies for Llama-3 RoPE scaling (explicit inverse frequencies replacing rope_theta's).
    """

    def __init__(self, d_model: int, *, num_heads: int, num_kv_heads: int, head_dim: int, v_head_dim: int,
                 num_slots: int, window: int, gate_temperature: float, rope_theta: float, impl: str,
                 chunk_size: int, dtype, init_std: float, rngs: nnx.Rngs, value_silu: bool = True,
                 output_norm: bool = True, qkv_bias: bool = False, norm_eps: float = 1e-6,
                 rope_frequencies: tuple[float, ...] | None = None):
        if num_heads % num_kv_heads:
            raise ValueError(f"model.num_heads={num_heads} must be a multiple of model.num_kv_heads={num_kv_heads}.")
        self.value_silu = value_silu
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim, self.num_slots = head_dim, v_head_dim, num_slots
        self.window, self.gate_temperature = window, gate_temperature
        # The operator takes a RoPE base or the inverse frequencies themselves, and rotates the window branch only.
        self.rope_theta = rope_frequencies if rope_frequencies is not None else rope_theta
        self.impl, self.chunk_size, self.dtype = impl, chunk_size, dtype

        def proj(d_out, use_bias=False):
            return Linear(d_model, d_out, ("embed", "heads"), dtype=dtype, init_std=init_std, rngs=rngs,
                          use_bias=use_bias)

        self.q_proj = proj(num_heads * head_dim, qkv_bias)
        self.k_proj = proj(num_kv_heads * head_dim, qkv_bias)
        self.v_proj = proj(num_kv_heads * v_head_dim, qkv_bias)
        self.gate_proj = proj(num_kv_heads * num_slots) if num_slots else None
        self.out_norm = RMSNorm(num_heads * v_head_dim, eps=norm_eps) if output_norm else None
        self.o_proj = Linear(num_heads * v_head_dim, d_model, ("heads", "embed"), dtype=dtype, init_std=init_std,
                             rngs=rngs)

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> q [B,T,H,dk], k [B,T,Hkv,dk], v [B,T,Hkv,dv] (after SiLU), log_alpha [B,T,Hkv,m] float32."""
        batch, seq = x.shape[:2]

        def heads(y, count, width):
            return constrain(y.reshape(batch, seq, count, width), ("batch", "seq", "act_heads", None))

        q = heads(self.q_proj(x), self.num_heads, self.head_dim)
        k = heads(self.k_proj(x), self.num_kv_heads, self.head_dim)
        v = self.v_proj(x)
        v = heads(jax.nn.silu(v) if self.value_silu else v, self.num_kv_heads, self.v_head_dim)
        if self.gate_proj is None:
            log_alpha = jnp.zeros((batch, seq, self.num_kv_heads, 0), jnp.float32)
        else:
            # The gate stays in float32: bf16 would round the per-token decay that compounds over thousands of steps.
            gate = heads(self.gate_proj(x), self.num_kv_heads, self.num_slots).astype(jnp.float32)
            log_alpha = jax.nn.log_sigmoid(gate) / self.gate_temperature
        return q, k, v, log_alpha

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """x [B, T, D], segment_ids [B, T] int (None = one document per row) -> [B, T, D]."""
        q, k, v, log_alpha = self.project(x)
        out = ops.nha_attention(q, k, v, log_alpha, window=self.window, rope_theta=self.rope_theta,
                                segment_ids=segment_ids, impl=self.impl, chunk_size=self.chunk_size)
        return self.output(out)

    def output(self, out: jax.Array) -> jax.Array:
        """The operator's output to the residual stream: out [B, T, H, dv] -> [B, T, D] (RMSNorm(SiLU(o)), o_proj)."""
        out = out.reshape(*out.shape[:2], self.num_heads * self.v_head_dim)
        if self.out_norm is not None:
            out = self.out_norm(jax.nn.silu(out))
        return self.o_proj(out)


def long_term_share(q: jax.Array, k: jax.Array, log_alpha: jax.Array, *, window: int, rope_theta: float
                    ) -> jax.Array:
    """The attention mass on the slots, sum_{i<=m} p_t[i] (NHA_SPEC section 1), for one document.

    A diagnostic probe, not a training path: dense in T, so keep T to a few hundred tokens.
    q [T, H, dk], k [T, Hkv, dk], log_alpha [T, Hkv, m] -> share [T, H] float32 in [0, 1].
    """
    seq, num_heads, head_dim = q.shape
    num_kv_heads, num_slots = log_alpha.shape[1:]
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5
    q = q.astype(jnp.float32).reshape(seq, num_kv_heads, group, head_dim)
    k = k.astype(jnp.float32)

    def write_slots(slot_keys, t):
        # Token t - W leaves the window at step t and enters the slots with its own gate.
        leaving = jnp.maximum(t - window, 0)
        gate = jnp.where(t >= window, log_alpha[leaving].astype(jnp.float32), 0.0)  # [Hkv, m]
        slot_keys = jnp.exp(gate)[..., None] * slot_keys - jnp.expm1(gate)[..., None] * k[leaving][:, None, :]
        return slot_keys, slot_keys

    initial = jnp.zeros((num_kv_heads, num_slots, head_dim), jnp.float32)
    _, slot_keys = jax.lax.scan(write_slots, initial, jnp.arange(seq))  # [T, Hkv, m, dk]
    slot_logits = scale * jnp.einsum("thgd,thmd->thgm", q, slot_keys)

    positions = jnp.arange(seq)
    window_logits = scale * jnp.einsum("thgd,jhd->thgj", apply_rope(q, positions, rope_theta),
                                       apply_rope(k, positions, rope_theta))
    in_window = (positions[None, :] <= positions[:, None]) & (positions[None, :] > positions[:, None] - window)
    window_logits = jnp.where(in_window[:, None, None, :], window_logits, -jnp.inf)

    probs = jax.nn.softmax(jnp.concatenate([slot_logits, window_logits], axis=-1), axis=-1)
    return jnp.sum(probs[..., :num_slots], axis=-1).reshape(seq, num_heads)
