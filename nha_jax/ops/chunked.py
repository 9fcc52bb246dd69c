"""The chunkwise NHA path in plain XLA (NHA_SPEC section 3): a lax.scan over chunks of C tokens.

The scan carries exactly the decode cache: the slot state and a ring of the last W tokens. Chunk c then sees the
"band" [ring ; chunk] = tokens [cC - W, cC + C), which holds both its window keys and, in its first C entries, the
tokens that enter the slots during the chunk (token t - W enters at step t). Per chunk the work is
O(C (m + C + W) d) and nothing of size T x T exists; the scan body is rematerialised in the backward pass, so
training memory is the carried states only, linear in T.
"""
import jax
import jax.numpy as jnp

from nha_jax.ops.rope import apply_rope


def _masked_exp(x, mask):
    """exp(x) where mask, else 0, with finite gradients (x may be +inf-prone outside the mask)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def nha_chunked(q, k, v, log_alpha, runs, positions, carry, *, window, scale, rope_theta, chunk_size):
    """Chunked NHA over one call.

    Args:
      q [B,T,H,dk], k [B,T,Hkv,dk], v [B,T,Hkv,dv], log_alpha [B,T,Hkv,m].
      runs int32 [B,T]: run ids from segments.runs_and_positions (run 0 continues the carried state).
      positions int32 [B,T]: RoPE positions.
      carry: (slot_k [B,Hkv,m,dk] f32, slot_v [B,Hkv,m,dv] f32, ring_k [B,R,Hkv,dk], ring_v [B,R,Hkv,dv],
        ring_log_alpha [B,R,Hkv,m] f32, ring_run [B,R] int32 (-1 = empty), ring_pos [B,R] int32,
        last_run [B] int32), with R = window, or R = min(window, T) when no state goes in or out.
      window, scale, rope_theta: as in nha_attention. chunk_size: C.
    Returns:
      out [B,T,H,dv] in q.dtype, and the carry after token T-1.
    """
    B, T, H, dk = q.shape
    Hkv, dv, m = k.shape[2], v.shape[3], log_alpha.shape[3]
    G, C, R = H // Hkv, chunk_size, carry[2].shape[1]
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    slots_fed = R == window  # else window > T: no token can reach the slots in this call

    def chunks(x, edge=False):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode="edge" if edge else "constant")
        return jnp.moveaxis(x.reshape((B, n_chunks, C) + x.shape[2:]), 1, 0)

    xs = (chunks(q.reshape(B, T, Hkv, G, dk)), chunks(k), chunks(v), chunks(log_alpha.astype(jnp.float32)),
          chunks(runs, edge=True), chunks(positions, edge=True),
          jnp.clip(T - C * jnp.arange(n_chunks), 0, C))  # real tokens per chunk; padding only ever trails
    r_idx = jnp.arange(C)

    def body(carry, xs):
        slot_k, slot_v, ring_k, ring_v, ring_la, ring_run, ring_pos, last_run = carry
        q_c, k_c, v_c, la_c, run_c, pos_c, n_real = xs
        band = lambda ring, x: jnp.concatenate([ring, x.astype(ring.dtype)], axis=1)
        k_b, v_b, la_b = band(ring_k, k_c), band(ring_v, v_c), band(ring_la, la_c)
        run_b, pos_b = band(ring_run, run_c), band(ring_pos, pos_c)
        qf = q_c.astype(jnp.float32)
        kf_b, vf_b = k_b.astype(jnp.float32), v_b.astype(jnp.float32)

        # Window logits: query r (token cC + r) sees band entry j (token cC - R + j) when t - W < j <= t.
        j_idx = jnp.arange(R + C)
        in_window = ((j_idx[None, :] <= r_idx[:, None] + R) & (j_idx[None, :] > r_idx[:, None] + R - window))[None]
        in_window = in_window & (run_b[:, None, :] == run_c[:, :, None])  # [B, r, j]
        q_rot, k_rot = (qf, kf_b) if rope_theta is None else (
            apply_rope(qf, pos_c, rope_theta), apply_rope(kf_b, pos_b, rope_theta))
        window_logits = scale * jnp.einsum("brhgd,bjhd->bhgrj", q_rot, k_rot)
        window_logits = jnp.where(in_window[:, None, None], window_logits, -jnp.inf)

        # The state after the chunk belongs to the document of its last real token.
        end_run = jax.lax.dynamic_index_in_dim(run_c, n_real - 1, axis=1, keepdims=False)
        if m == 0:
            p = jax.nn.softmax(window_logits, axis=-1)
            out = jnp.einsum("bhgrj,bjhe->brhge", p, vf_b)
        else:
            # Step r feeds band entry r (token t - W) into the slots, within its own document only.
            feeds = (run_b[:, :C] == run_c) & (r_idx < n_real)[None] & slots_fed  # [B, r]
            gate = jnp.where(feeds[..., None, None], la_b[:, :C], 0.0)  # [B, r, Hkv, m]
            write = -jnp.expm1(gate)
            cum = jnp.cumsum(gate, axis=1)  # chunk-local cumulative log gates, <= 0 and non-increasing
            # between[b,r,s,h,i] = sum of the gates of steps s+1..r, summed directly rather than as cum_r - cum_s,
            # which would cancel catastrophically once |cum| is large. Every exponent below is <= 0.
            later = (r_idx[:, None] > r_idx[None, :])[None, :, :, None, None]
            between = jnp.cumsum(jnp.where(later, gate[:, :, None], 0.0), axis=1)
            k_in, v_in = kf_b[:, :C], vf_b[:, :C]

            visible = (r_idx[:, None] >= r_idx[None, :])[None] & (run_c[:, :, None] == run_c[:, None, :])
            decay = _masked_exp(between, visible[..., None, None]) * write[:, None]  # [B, r, s, Hkv, m]
            # The carried slots reach step r, decayed by exp(cum_r), if r continues the carried document.
            carried = jnp.where((run_c == last_run[:, None])[..., None, None], jnp.exp(cum), 0.0)  # [B, r, Hkv, m]

            qk_in = jnp.einsum("brhgd,bshd->bhgrs", qf, k_in)
            slot_logits = scale * (jnp.einsum("brhgd,bhid,brhi->bhgri", qf, slot_k, carried)
                                   + jnp.einsum("bhgrs,brshi->bhgri", qk_in, decay))
            p = jax.nn.softmax(jnp.concatenate([slot_logits, window_logits], axis=-1), axis=-1)
            p_slots, p_window = p[..., :m], p[..., m:]
            out = (jnp.einsum("bhgri,brhi,bhie->brhge", p_slots, carried, slot_v)
                   + jnp.einsum("bhgri,brshi,bshe->brhge", p_slots, decay, v_in)
                   + jnp.einsum("bhgrj,bjhe->brhge", p_window, vf_b))

            to_end = _masked_exp(between[:, -1], (run_c == end_run[:, None])[..., None, None]) * write
            keep = jnp.where((last_run == end_run)[:, None, None], jnp.exp(cum[:, -1]), 0.0)[..., None]
            slot_k = keep * slot_k + jnp.einsum("bshi,bshd->bhid", to_end, k_in)
            slot_v = keep * slot_v + jnp.einsum("bshi,bshe->bhie", to_end, v_in)

        # The new ring is the last R real tokens of the band.
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, n_real, R, axis=1)
        carry = (slot_k, slot_v, take(k_b), take(v_b), take(la_b), take(run_b), take(pos_b), end_run)
        return carry, out.astype(q.dtype)

    carry, out = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), carry, xs)
    out = jnp.moveaxis(out, 0, 1).reshape(B, n_chunks * C, H, dv)[:, :T]
    return out, carry
