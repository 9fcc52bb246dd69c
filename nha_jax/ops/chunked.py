"""The chunkwise NHA path in plain XLA (NHA_SPEC section 3).

Tokens are cut into chunks of C; a lax.scan walks over groups of chunks ("steps" of about STEP_TOKENS tokens) and
carries exactly the decode cache: the slot state and a ring of the last R = W tokens. Inside a step every chunk is
processed at once: chunk j sees the "band" of tokens [jC - W, jC + C), which holds both its window keys and, in its
first C entries, the tokens that enter the slots during the chunk (token t - W enters at step t). The slot states
entering each chunk come from an associative scan of the per-chunk (decay, contribution) pairs.

Inside a chunk, the slot terms need the gate decay from every feeding step s to every later step r, a C x C x m
tensor if written out. Chunks are cut into sub-chunks of c = SUB_CHUNK steps instead (two levels, as in
flash-linear-attention's GLA kernels): between sub-chunks the decay factors into (start of r's sub-chunk -> r) x
(sub-chunks in between) x (s -> end of s's sub-chunk), every factor an exp of a direct sum of gates (<= 0, so no
overflow, and no cancellation), which turns those terms into matmuls. Only the c x c diagonal blocks are written
out. Per chunk the work is O(C (m + C + W) d); nothing of size T x T exists; the step body is rematerialised in the
backward pass, so training memory is the carried states plus one step's intermediates, linear in T.

Matmul operands stay in the input dtype (bf16 inputs: bf16 operands, float32 accumulation); gates, decays, the
softmax and the slot states are float32.
"""
import jax
import jax.numpy as jnp

from nha_jax.ops.rope import apply_rope

STEP_TOKENS = 512  # tokens per scan step (per row): enough parallel work for a GPU, bounded memory per step
SUB_CHUNK = 8  # c: steps per sub-chunk, the side of the explicit decay blocks


def _masked_exp(x, mask):
    """exp(x) where mask, else 0, with finite gradients (x may be +inf-prone outside the mask)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _chain(first, second):
    """Composes two slot updates S -> a S + b (associative_scan's operator)."""
    a1, k1, v1 = first
    a2, k2, v2 = second
    return a1 * a2, a2 * k1 + k2, a2 * v1 + v2


def _sum_before(x, axis):
    """Exclusive cumulative sum along `axis`: entry i sums the entries before i (a direct sum, no subtraction)."""
    total = jnp.cumsum(x, axis=axis)
    shifted = jax.lax.slice_in_dim(total, 0, x.shape[axis] - 1, axis=axis)
    return jnp.concatenate([jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis)), shifted], axis=axis)


def _sum_after(x, axis):
    """Reverse exclusive cumulative sum along `axis`: entry i sums the entries after i."""
    return jnp.flip(_sum_before(jnp.flip(x, axis), axis), axis)


def _matmul(spec, a, b, dtype):
    """einsum of two operands cast to `dtype`, accumulated in float32."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def nha_chunked(q, k, v, log_alpha, runs, positions, carry, *, window, scale, rope_theta, chunk_size):
    """Chunked NHA over one call.

    Args:
      q [B,T,H,dk], k [B,T,Hkv,dk], v [B,T,Hkv,dv], log_alpha [B,T,Hkv,m].
      runs int32 [B,T]: run ids from segments.runs_and_positions (run 0 continues the carried state).
      positions int32 [B,T]: RoPE positions.
      carry: (slot_k [B,Hkv,m,dk] f32, slot_v [B,Hkv,m,dv] f32, ring_k [B,R,Hkv,dk], ring_v [B,R,Hkv,dv],
        ring_log_alpha [B,R,Hkv,m] f32, ring_run [B,R] int32 (-1 = empty), ring_pos [B,R] int32,
        last_run [B] int32), with R = window, or R = min(window, T) when no state goes in or out.
      window, scale, rope_theta: as in nha_attention. chunk_size: C, rounded up to whole sub-chunks (and down to T).
    Returns:
      out [B,T,H,dv] in q.dtype, and the carry after token T-1.
    """
    B, T, H, dk = q.shape
    Hkv, dv, m = k.shape[2], v.shape[3], log_alpha.shape[3]
    G, R = H // Hkv, carry[2].shape[1]
    c = min(SUB_CHUNK, chunk_size, T)
    C = c * -(-min(chunk_size, T) // c)  # padding only ever trails, so a longer last chunk is harmless
    P = C // c  # sub-chunks per chunk
    n = max(1, min(STEP_TOKENS // C, -(-T // C)))  # chunks per scan step
    n_steps = -(-T // (n * C))
    pad = n_steps * n * C - T
    slots_fed = R == window  # else window > T: no token can reach the slots in this call
    # Matmul operand type: 16-bit inputs feed the tensor cores as they are; anything else computes in float32.
    operand = q.dtype if q.dtype == k.dtype == v.dtype and jnp.finfo(q.dtype).bits == 16 else jnp.float32

    def steps(x, edge=False):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode="edge" if edge else "constant")
        return jnp.moveaxis(x.reshape((B, n_steps, n * C) + x.shape[2:]), 1, 0)

    xs = (steps(q.reshape(B, T, Hkv, G, dk)), steps(k), steps(v), steps(log_alpha.astype(jnp.float32)),
          steps(runs, edge=True), steps(positions, edge=True),
          jnp.clip(T - n * C * jnp.arange(n_steps), 0, n * C))  # real tokens per step; padding only ever trails
    r_idx, p_idx, c_idx = jnp.arange(C), jnp.arange(P), jnp.arange(c)
    band_idx = C * jnp.arange(n)[:, None] + jnp.arange(R + C)[None, :]  # chunk j's band in [ring ; step tokens]
    earlier = p_idx[None, :] < p_idx[:, None]  # [R, S]: sub-chunk S comes before sub-chunk R
    causal = r_idx[:, None] >= r_idx[None, :]  # [r, s]
    causal_sub = c_idx[:, None] >= c_idx[None, :]

    def body(carry, xs):
        slot_k, slot_v, ring_k, ring_v, ring_la, ring_run, ring_pos, last_run = carry
        q_s, k_s, v_s, la_s, run_s, pos_s, n_real = xs
        ext = lambda ring, x: jnp.concatenate([ring, x.astype(ring.dtype)], axis=1)
        ext_k, ext_v, ext_la = ext(ring_k, k_s), ext(ring_v, v_s), ext(ring_la, la_s)
        ext_run, ext_pos = ext(ring_run, run_s), ext(ring_pos, pos_s)
        band = lambda x: jnp.take(x, band_idx, axis=1)  # [B, n, R + C, ...]
        chunked = lambda x: x.reshape((B, n, C) + x.shape[2:])
        # Band entries [0, C) of chunk j are tokens jC - R + [0, C): the first n C tokens of [ring ; step tokens].
        fed = lambda x: chunked(x[:, :n * C])
        k_rot = ext_k if rope_theta is None else apply_rope(ext_k, ext_pos, rope_theta)
        k_rot_b, v_b, run_b = band(k_rot.astype(operand)), band(ext_v), band(ext_run)
        q_c, run_c, pos_c = chunked(q_s), chunked(run_s), chunked(pos_s)

        # Window logits: query r (token jC + r) sees band entry u (token jC - R + u) when t - W < u <= t.
        u_idx = jnp.arange(R + C)
        in_window = (u_idx[None, :] <= r_idx[:, None] + R) & (u_idx[None, :] > r_idx[:, None] + R - window)
        in_window = in_window & (run_b[:, :, None, :] == run_c[..., None])  # [B, n, r, u]
        q_rot = q_c if rope_theta is None else apply_rope(q_c, pos_c, rope_theta)
        window_logits = scale * _matmul("bnrhgd,bnuhd->bnhgru", q_rot, k_rot_b, operand)
        window_logits = jnp.where(in_window[:, :, None, None], window_logits, -jnp.inf)

        # The state after a chunk belongs to the document of its last token (padding repeats the last real run).
        end_run = run_c[:, :, -1]  # [B, n]
        if m == 0:
            p = jax.nn.softmax(window_logits, axis=-1)
            out = _matmul("bnhgru,bnuhe->bnrhge", p, v_b, operand)
        else:
            # Step r of chunk j feeds band entry r (token t - W) into the slots, within its own document only.
            step_real = (C * jnp.arange(n)[:, None] + r_idx[None, :]) < n_real  # [n, r]
            feeds = (fed(ext_run) == run_c) & step_real & slots_fed  # [B, n, r]
            # Gates and decays are laid out head-major, [B, n, Hkv, C, m], the layout their matmuls read.
            gate = jnp.moveaxis(jnp.where(feeds[..., None, None], fed(ext_la), 0.0), 3, 2)
            if not slots_fed:
                # The gates are then a constant 0; the barrier stops XLA from constant-folding the cumulative sums
                # below element by element (it took minutes per layer on GPU for the Triton path's same gates).
                gate = jax.lax.optimization_barrier(gate)
            write = -jnp.expm1(gate)
            cum = jnp.cumsum(gate, axis=3)  # chunk-local cumulative log gates, <= 0 and non-increasing
            k_in, v_in = fed(ext_k), fed(ext_v)
            sub = lambda x, axis: x.reshape(x.shape[:axis] + (P, c) + x.shape[axis + 1:])  # C -> (P, c)
            gate_sub, write_sub, run_sub = sub(gate, 3), sub(write, 3), sub(run_c, 2)

            # Every decay is exp of a direct sum of gates (<= 0), never a difference of cumulative sums, which
            # would cancel catastrophically once |cum| is large.
            since_start = jnp.cumsum(gate_sub, axis=4)  # from the start of the sub-chunk up to r, inclusive
            to_sub_end = _sum_after(gate_sub, axis=4)  # after s, up to the end of its sub-chunk
            totals = since_start[..., -1, :]  # [B, n, Hkv, P, m]
            gap = _sum_before(jnp.where(earlier[:, :, None], totals[:, :, :, :, None], 0.0), axis=3)  # [.., R, S, m]
            hop = _masked_exp(gap, earlier[:, :, None])  # from the end of S to the start of R, when S < R
            sent = jnp.exp(to_sub_end) * write_sub  # s's write, decayed to the end of its sub-chunk
            # reach[R, s]: s's write as seen at the start of sub-chunk R, for s in an earlier sub-chunk (else 0).
            reach = (hop[:, :, :, :, :, None] * sent[:, :, :, None]).reshape(B, n, Hkv, P, C, m)
            arrive = jnp.exp(since_start).reshape(B, n, Hkv, C, m)  # from the start of r's sub-chunk to r
            # The diagonal blocks, written out: near[P, r, s] = decay of s's write by step r within sub-chunk P.
            after_s = (c_idx[:, None] > c_idx[None, :])[:, :, None]
            near_gap = jnp.cumsum(jnp.where(after_s, gate_sub[:, :, :, :, :, None], 0.0), axis=4)
            same_doc = run_sub[..., :, None] == run_sub[..., None, :]  # [B, n, P, r, s]
            near = (_masked_exp(near_gap, (causal_sub & same_doc)[:, :, None, ..., None])
                    * write_sub[:, :, :, :, None])  # [B, n, Hkv, P, r, s, m]
            visible = causal & (run_c[..., :, None] == run_c[..., None, :])  # [B, n, r, s]

            # Slot states entering each chunk: S_{j+1} = keep_j S_j + contribution_j, chained by an associative scan.
            enter_run = jnp.concatenate([last_run[:, None], end_run[:, :-1]], axis=1)  # [B, n]
            to_end = _masked_exp(to_sub_end + _sum_after(totals, axis=3)[:, :, :, :, None],
                                 (run_sub == end_run[..., None, None])[:, :, None, :, :, None]) * write_sub
            to_end = to_end.reshape(B, n, Hkv, C, m)
            keep = jnp.where((enter_run == end_run)[..., None, None], jnp.exp(cum[..., -1, :]), 0.0)[..., None]
            _, chained_k, chained_v = jax.lax.associative_scan(
                _chain, (keep, jnp.einsum("bnhsi,bnshd->bnhid", to_end, k_in.astype(jnp.float32)),
                         jnp.einsum("bnhsi,bnshe->bnhie", to_end, v_in.astype(jnp.float32))), axis=1)
            decay_all = jnp.cumprod(keep, axis=1)  # the carried-in state's share after each chunk
            after_k = decay_all * slot_k[:, None] + chained_k  # [B, n, Hkv, m, dk]: state after chunk j
            after_v = decay_all * slot_v[:, None] + chained_v
            enter_k = jnp.concatenate([slot_k[:, None], after_k[:, :-1]], axis=1)
            enter_v = jnp.concatenate([slot_v[:, None], after_v[:, :-1]], axis=1)
            # The entering slots reach step r, decayed by exp(cum_r), if r continues the entering document.
            carried = jnp.where((run_c == enter_run[..., None])[:, :, None, :, None], jnp.exp(cum), 0.0)
            carried, arrive = carried[:, :, :, None], arrive[:, :, :, None]  # broadcast over the query group

            qk = jnp.where(visible[:, :, None, None], _matmul("bnrhgd,bnshd->bnhgrs", q_c, k_in, operand), 0.0)
            far = jnp.einsum("bnhgRrs,bnhRsi->bnhgRri", qk.reshape(B, n, Hkv, G, P, c, C), reach)
            qk_near = _matmul("bnPrhgd,bnPshd->bnhgPrs", sub(q_c, 2), sub(k_in, 2), operand)
            # The near terms are einsums rather than multiply-and-sum: XLA:CPU's YNNPACK fusion of the latter
            # crashes (segfault, jax 0.10.2) when G = 1.
            near_logits = jnp.einsum("bnhgPrs,bnhPrsi->bnhgPri", qk_near, near)
            entering = jnp.einsum("bnrhgd,bnhid->bnhgri", q_c.astype(jnp.float32), enter_k)
            slot_logits = scale * (entering * carried + far.reshape(B, n, Hkv, G, C, m) * arrive
                                   + near_logits.reshape(B, n, Hkv, G, C, m))
            p = jax.nn.softmax(jnp.concatenate([slot_logits, window_logits], axis=-1), axis=-1)
            p_slots, p_window = p[..., :m], p[..., m:]

            # Slot reads of the fed values, as weights on the band entries they came from (the first C).
            p_arrive = (p_slots * arrive).reshape(B, n, Hkv, G, P, c, m)
            far_weights = jnp.einsum("bnhgRri,bnhRsi->bnhgRrs", p_arrive, reach).reshape(B, n, Hkv, G, C, C)
            near_weights = jnp.einsum("bnhgPri,bnhPrsi->bnhgPrs", p_slots.reshape(B, n, Hkv, G, P, c, m), near)
            far_weights = jnp.where(visible[:, :, None, None], far_weights, 0.0)
            band_weights = p_window + jnp.pad(far_weights, [(0, 0)] * 5 + [(0, R)])
            out = (_matmul("bnhgru,bnuhe->bnrhge", band_weights, v_b, operand)
                   + _matmul("bnhgPrs,bnPshe->bnPrhge", near_weights, sub(v_in, 2), operand).reshape(
                       B, n, C, Hkv, G, dv)
                   + jnp.einsum("bnhgri,bnhie->bnrhge", p_slots * carried, enter_v))
            slot_k, slot_v = after_k[:, -1], after_v[:, -1]

        # The new ring is the last R real tokens of [ring ; step tokens].
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, n_real, R, axis=1)
        carry = (slot_k, slot_v, take(ext_k), take(ext_v), take(ext_la), take(ext_run), take(ext_pos),
                 end_run[:, -1])
        return carry, out.reshape(B, n * C, H, dv).astype(q.dtype)

    carry, out = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), carry, xs)
    out = jnp.moveaxis(out, 0, 1).reshape(B, n_steps * n * C, H, dv)[:, :T]
    return out, carry
