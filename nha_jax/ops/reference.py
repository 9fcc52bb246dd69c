"""The two reference forms of NHA (NHA_SPEC section 2): the token recurrence and the dense parallel form.

Both are written for clarity, not speed; every fast path is tested against them.
"""
import jax
import jax.numpy as jnp

from nha_jax.ops.decode import decode_step, init_state
from nha_jax.ops.rope import apply_rope
from nha_jax.ops.segments import runs_and_positions


def nha_recurrent(q, k, v, log_alpha, *, window, scale, rope_theta, segment_ids=None, initial_state=None):
    """O(T) token-by-token form: a lax.scan of the decode step. The oracle for values and states.

    Shapes as in nha_attention. Returns (out [B, T, H, dv], final NHAState).
    """
    B, _, _, dk = q.shape
    Hkv, dv, m = v.shape[2], v.shape[3], log_alpha.shape[3]
    state = initial_state if initial_state is not None else init_state(B, Hkv, m, dk, dv, window, k.dtype)

    def step(state, xs):
        q_t, k_t, v_t, la_t, seg_t = xs
        out, state = decode_step(state, q_t, k_t, v_t, la_t, scale=scale, rope_theta=rope_theta, segment_id=seg_t)
        return state, out

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    seg = None if segment_ids is None else time_major(segment_ids)
    state, out = jax.lax.scan(step, state, (time_major(q), time_major(k), time_major(v), time_major(log_alpha), seg))
    return jnp.moveaxis(out, 0, 1), state


def _segment_sums(g):
    """sums[..., t, r] = sum_{r < u <= t} g[..., u] for r <= t, -inf above the diagonal. g [..., T]."""
    T = g.shape[-1]
    below = jnp.tril(jnp.ones((T, T), bool), k=-1)
    sums = jnp.cumsum(jnp.where(below, g[..., :, None], 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((T, T), bool)), sums, -jnp.inf)


def nha_naive(q, k, v, log_alpha, *, window, scale, rope_theta, segment_ids=None):
    """O(T^2 m) dense parallel form. The oracle for gradients; memory grows with T^2, tests only.

    Shapes as in nha_attention (no state). Returns out [B, T, H, dv] in q.dtype.
    """
    B, T, H, dk = q.shape
    Hkv, m = k.shape[2], log_alpha.shape[3]
    G = H // Hkv
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids
    runs, pos = runs_and_positions(seg, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))
    t = jnp.arange(T)
    same_run = runs[:, :, None] == runs[:, None, :]  # [B, t, j]

    qf = q.astype(jnp.float32).reshape(B, T, Hkv, G, dk)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    q_rot, k_rot = (qf, kf) if rope_theta is None else (apply_rope(qf, pos, rope_theta), apply_rope(kf, pos, rope_theta))
    in_window = same_run & (t[None, None, :] <= t[None, :, None]) & (t[None, None, :] > t[None, :, None] - window)
    window_logits = scale * jnp.einsum("bthgd,bjhd->bhgtj", q_rot, k_rot)
    window_logits = jnp.where(in_window[:, None, None], window_logits, -jnp.inf)

    # Step r feeds token r - W into the slots, if that token belongs to step r's document.
    shift = lambda x: jnp.pad(x, [(0, 0), (window, 0)] + [(0, 0)] * (x.ndim - 2))[:, :T]
    feeds = (t >= window)[None, :] & (shift(runs) == runs)  # [B, r]
    la_in = jnp.where(feeds[..., None, None], shift(log_alpha.astype(jnp.float32)), 0.0)  # [B, r, Hkv, m]
    write = -jnp.expm1(la_in)
    k_in, v_in = shift(kf), shift(vf)

    # decay[b,h,i,t,r] = exp(sum of gates of steps r+1..t) * write strength of step r, within one document.
    sums = _segment_sums(jnp.moveaxis(la_in, 1, -1))  # [B, Hkv, m, t, r]
    visible = same_run[:, None, None]
    decay = jnp.where(visible, jnp.exp(jnp.where(visible, sums, 0.0)), 0.0) * jnp.moveaxis(write, 1, -1)[..., None, :]
    qk_in = jnp.einsum("bthgd,brhd->bhgtr", qf, k_in)
    slot_logits = scale * jnp.einsum("bhgtr,bhitr->bhgti", qk_in, decay)

    p = jax.nn.softmax(jnp.concatenate([slot_logits, window_logits], axis=-1), axis=-1)
    slot_weights = jnp.einsum("bhgti,bhitr->bhgtr", p[..., :m], decay)
    out = jnp.einsum("bhgtr,brhe->bthge", slot_weights, v_in) + jnp.einsum("bhgtj,bjhe->bthge", p[..., m:], vf)
    return out.reshape(B, T, H, -1).astype(q.dtype)
