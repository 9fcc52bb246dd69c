"""The chunkwise NHA path in plain XLA (NHA_SPEC section 3).

Tokens are cut into chunks of C; a lax.scan walks over groups of chunks ("steps" of about STEP_TOKENS tokens) and
carries exactly the decode cache: the slot state and a ring of the last R = W tokens. Inside a step every chunk is
processed at once: chunk j sees the "band" of tokens [jC - W, jC + C), which holds both its window keys and, in its
first C entries, the tokens that enter the slots during the chunk (token t - W enters at step t). The slot states
entering each chunk come from an associative scan of the per-chunk (decay, contribution) pairs. Per chunk the work is
O(C (m + C + W) d); nothing of size T x T exists; the step body is rematerialised in the backward pass, so training
memory is the carried states plus one step's intermediates, linear in T.
"""
import jax
import jax.numpy as jnp

from nha_jax.ops.rope import apply_rope

STEP_TOKENS = 512  # tokens per scan step: enough parallel work for a GPU, bounded memory per step


def _masked_exp(x, mask):
    """exp(x) where mask, else 0, with finite gradients (x may be +inf-prone outside the mask)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _chain(first, second):
    """Composes two slot updates S -> a S + b (associative_scan's operator)."""
    a1, k1, v1 = first
    a2, k2, v2 = second
    return a1 * a2, a2 * k1 + k2, a2 * v1 + v2


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
    G, C, R = H // Hkv, min(chunk_size, T), carry[2].shape[1]
    n = max(1, min(STEP_TOKENS // C, -(-T // C)))  # chunks per scan step
    n_steps = -(-T // (n * C))
    pad = n_steps * n * C - T
    slots_fed = R == window  # else window > T: no token can reach the slots in this call

    def steps(x, edge=False):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode="edge" if edge else "constant")
        return jnp.moveaxis(x.reshape((B, n_steps, n * C) + x.shape[2:]), 1, 0)

    xs = (steps(q.reshape(B, T, Hkv, G, dk)), steps(k), steps(v), steps(log_alpha.astype(jnp.float32)),
          steps(runs, edge=True), steps(positions, edge=True),
          jnp.clip(T - n * C * jnp.arange(n_steps), 0, n * C))  # real tokens per step; padding only ever trails
    r_idx = jnp.arange(C)
    band_idx = C * jnp.arange(n)[:, None] + jnp.arange(R + C)[None, :]  # chunk j's band in [ring ; step tokens]

    def body(carry, xs):
        slot_k, slot_v, ring_k, ring_v, ring_la, ring_run, ring_pos, last_run = carry
        q_s, k_s, v_s, la_s, run_s, pos_s, n_real = xs
        ext = lambda ring, x: jnp.concatenate([ring, x.astype(ring.dtype)], axis=1)
        ext_k, ext_v, ext_la = ext(ring_k, k_s), ext(ring_v, v_s), ext(ring_la, la_s)
        ext_run, ext_pos = ext(ring_run, run_s), ext(ring_pos, pos_s)
        band = lambda x: jnp.take(x, band_idx, axis=1)  # [B, n, R + C, ...]
        chunked = lambda x: x.reshape((B, n, C) + x.shape[2:])
        k_b, v_b = band(ext_k).astype(jnp.float32), band(ext_v).astype(jnp.float32)
        run_b, pos_b = band(ext_run), band(ext_pos)
        qf, run_c, pos_c = chunked(q_s).astype(jnp.float32), chunked(run_s), chunked(pos_s)

        # Window logits: query r (token jC + r) sees band entry u (token jC - R + u) when t - W < u <= t.
        u_idx = jnp.arange(R + C)
        in_window = (u_idx[None, :] <= r_idx[:, None] + R) & (u_idx[None, :] > r_idx[:, None] + R - window)
        in_window = in_window & (run_b[:, :, None, :] == run_c[..., None])  # [B, n, r, u]
        q_rot, k_rot = (qf, k_b) if rope_theta is None else (
            apply_rope(qf, pos_c, rope_theta), apply_rope(k_b, pos_b, rope_theta))
        window_logits = scale * jnp.einsum("bnrhgd,bnuhd->bnhgru", q_rot, k_rot)
        window_logits = jnp.where(in_window[:, :, None, None], window_logits, -jnp.inf)

        # The state after a chunk belongs to the document of its last token (padding repeats the last real run).
        end_run = run_c[:, :, -1]  # [B, n]
        if m == 0:
            p = jax.nn.softmax(window_logits, axis=-1)
            out = jnp.einsum("bnhgru,bnuhe->bnrhge", p, v_b)
        else:
            # Step r of chunk j feeds band entry r (token t - W) into the slots, within its own document only.
            step_real = (C * jnp.arange(n)[:, None] + r_idx[None, :]) < n_real  # [n, r]
            feeds = (run_b[:, :, :C] == run_c) & step_real & slots_fed  # [B, n, r]
            gate = jnp.where(feeds[..., None, None], band(ext_la)[:, :, :C], 0.0)  # [B, n, r, Hkv, m]
            write = -jnp.expm1(gate)
            cum = jnp.cumsum(gate, axis=2)  # chunk-local cumulative log gates, <= 0 and non-increasing
            # between[..., r, s, :, :] = sum of the gates of steps s+1..r, summed directly rather than as
            # cum_r - cum_s, which would cancel catastrophically once |cum| is large. Every exponent is <= 0.
            later = (r_idx[:, None] > r_idx[None, :])[:, :, None, None]
            between = jnp.cumsum(jnp.where(later, gate[:, :, :, None], 0.0), axis=2)  # [B, n, r, s, Hkv, m]
            visible = (r_idx[:, None] >= r_idx[None, :]) & (run_c[..., :, None] == run_c[..., None, :])
            decay = _masked_exp(between, visible[..., None, None]) * write[:, :, None]
            k_in, v_in = k_b[:, :, :C], v_b[:, :, :C]

            # Slot states entering each chunk: S_{j+1} = keep_j S_j + contribution_j, chained by an associative scan.
            enter_run = jnp.concatenate([last_run[:, None], end_run[:, :-1]], axis=1)  # [B, n]
            to_end = _masked_exp(between[:, :, -1], (run_c == end_run[..., None])[..., None, None]) * write
            keep = jnp.where((enter_run == end_run)[..., None, None], jnp.exp(cum[:, :, -1]), 0.0)[..., None]
            _, chained_k, chained_v = jax.lax.associative_scan(
                _chain, (keep, jnp.einsum("bnshi,bnshd->bnhid", to_end, k_in),
                         jnp.einsum("bnshi,bnshe->bnhie", to_end, v_in)), axis=1)
            decay_all = jnp.cumprod(keep, axis=1)  # the carried-in state's share after each chunk
            after_k = decay_all * slot_k[:, None] + chained_k  # [B, n, Hkv, m, dk]: state after chunk j
            after_v = decay_all * slot_v[:, None] + chained_v
            enter_k = jnp.concatenate([slot_k[:, None], after_k[:, :-1]], axis=1)
            enter_v = jnp.concatenate([slot_v[:, None], after_v[:, :-1]], axis=1)
            # The entering slots reach step r, decayed by exp(cum_r), if r continues the entering document.
            carried = jnp.where((run_c == enter_run[..., None])[..., None, None], jnp.exp(cum), 0.0)

            qk_in = jnp.einsum("bnrhgd,bnshd->bnhgrs", qf, k_in)
            slot_logits = scale * (jnp.einsum("bnrhgd,bnhid,bnrhi->bnhgri", qf, enter_k, carried)
                                   + jnp.einsum("bnhgrs,bnrshi->bnhgri", qk_in, decay))
            p = jax.nn.softmax(jnp.concatenate([slot_logits, window_logits], axis=-1), axis=-1)
            p_slots, p_window = p[..., :m], p[..., m:]
            out = (jnp.einsum("bnhgri,bnrhi,bnhie->bnrhge", p_slots, carried, enter_v)
                   + jnp.einsum("bnhgri,bnrshi,bnshe->bnrhge", p_slots, decay, v_in)
                   + jnp.einsum("bnhgru,bnuhe->bnrhge", p_window, v_b))
            slot_k, slot_v = after_k[:, -1], after_v[:, -1]

        # The new ring is the last R real tokens of [ring ; step tokens].
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, n_real, R, axis=1)
        carry = (slot_k, slot_v, take(ext_k), take(ext_v), take(ext_la), take(ext_run), take(ext_pos),
                 end_run[:, -1])
        return carry, out.reshape(B, n * C, H, dv).astype(q.dtype)

    carry, out = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), carry, xs)
    out = jnp.moveaxis(out, 0, 1).reshape(B, n_steps * n * C, H, dv)[:, :T]
    return out, carry
