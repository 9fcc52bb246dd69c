"""Native Hybrid Attention on TPU: fused Pallas (Mosaic TPU) forward and backward kernels, their launcher, and the
custom_vjp that ties them together.

Layout. The launcher moves heads in front of time ([B, H, T, d]) so that every block's last two dims are (chunk, d)
or (chunk, m): chunk is a multiple of 8 (16 for bf16) and d, m are full dims, which is what Mosaic's (8, 128) tiling
rule asks for. Per-token integers travel as [B, T, 1] columns for the same reason.

Work split (NHA_SPEC section 3, one fused pass per query chunk of C tokens):
  * Everything the XLA side can do cheaply and differentiably happens in the launcher: the logit scale, RoPE on the
    window queries and keys, the shift of the slot inputs by W (k'_t = k_{t-W}, zero where token t - W is not in
    token t's run), the write strengths s' = 1 - alpha and decay gates g' = log alpha of those shifted inputs, the run
    start of every token, padding T up to a multiple of C. JAX differentiates all of that; the kernels see only the
    "core": gated slot attention over the shifted inputs plus a banded softmax window, one joint softmax.
  * Forward kernel, grid (B, H, chunk, key block): the chunk axis is sequential ("arbitrary") and carries the slot
    state (m x dk, m x dv, float32) in VMEM scratch; at key block 0 it computes the slot logits, their read (GSA
    passes 1 and 2 with chunk-local cumulative gates) and advances the state; the key-block axis then runs an online
    softmax over the window keys of the W most recent tokens (any W: ceil((W - 1) / C) + 1 key blocks). It writes
    the output, the row log-sum-exp, and the slot state at the start of every chunk (small: T / C states), so that
    the backward recomputes everything else instead of storing T x (m + W) probabilities.
  * Backward: one kernel runs the chunks in reverse with the state gradient in VMEM scratch (slot branch: dq, dk',
    dv', ds', dg' and the initial-state gradient); two banded flash-attention kernels give the window's dq and
    dk / dv. Kernels work per query head; the launcher sums kv-side gradients over each GQA group.

Gate exponents. Inside a chunk the gate ratios exp(Gamma_t - Gamma_j) are factored through the chunk's middle row, so
each factor spans at most C / 2 tokens of gates: exact while the gates of C / 2 consecutive tokens sum to more than
about -80 (mean log alpha > -2.5 at C = 64, i.e. logsigmoid(f) / 8 with f > -20). State decay across chunks uses
plain exp(Gamma) <= 1 and has no such limit.

No TPU hardware was available when this was written: the numerics are verified in interpret mode and the kernels
are verified to compile with the real Mosaic compiler for v5e / v5p / v6e (tests/test_pallas_tpu.py,
tests/test_tpu_compile.py, docs/TPU.md).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import name_residuals
from pallas_kernels.rope import rope

# Finite "minus infinity" for masked logits: a fully masked row then gives zeros, never NaN.
_MASKED = -1e30

# Query/key chunk length per (largest head dim) class, (head dim bound, chunk): fixed, not searched at run time.
# 64 keeps the in-chunk gate exponents bounded (see the module docstring) and VMEM per grid step small up to
# d = 256 (compile-tested); larger head dims (not compile-tested) halve it. Untuned on hardware.
_CHUNK_BY_HEAD_DIM = ((256, 64),)
_CHUNK_FOR_LARGER_HEADS = 32


def default_chunk_size(head_dim):
    """The chunk length the launcher uses for a head dim (the largest of dk, dv)."""
    for bound, chunk in _CHUNK_BY_HEAD_DIM:
        if head_dim <= bound:
            return chunk
    return _CHUNK_FOR_LARGER_HEADS


# ----------------------------------------------------------------------------------------------------------------
# Small in-kernel helpers (all values are 2-D VMEM arrays).

def _precision(a, b):
    # Explicit, so a global jax_default_matmul_precision cannot ask Mosaic for fp32 passes on bf16 operands (it
    # refuses); float32 operands (slot branch, gates) get full float32 precision.
    both_f32 = a.dtype == jnp.float32 and b.dtype == jnp.float32
    return jax.lax.Precision.HIGHEST if both_f32 else jax.lax.Precision.DEFAULT


def _contract(a, b, a_axis, b_axis):
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())), precision=_precision(a, b),
                               preferred_element_type=jnp.float32)


def _dot(a, b):
    """a [M, K] @ b [K, N] in float32."""
    return _contract(a, b, 1, 0)


def _dot_nt(a, b):
    """a [M, K] @ b[N, K]^T in float32."""
    return _contract(a, b, 1, 1)


def _dot_tn(a, b):
    """a[K, M]^T @ b [K, N] in float32."""
    return _contract(a, b, 0, 0)


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _window_mask(query_first, key_first, run_start, chunk, window):
    """[C, C] bool: key j is in query t's window (t - W < j <= t) and run. run_start [C, 1] of the query rows."""
    t = query_first + _iota((chunk, chunk), 0)
    j = key_first + _iota((chunk, chunk), 1)
    return (j <= t) & (j > t - window) & (j >= run_start)


class _SlotChunk:
    """The slot branch of one chunk, recomputed identically by the forward and the backward kernel.

    Shapes: C chunk rows, m slots. q [C, dk] (scaled, un-rotated); ks [C, dk], vs [C, dv], ws, gs [C, m] are the
    shifted slot inputs; slot_k [m, dk], slot_v [m, dv] the state at the chunk start (float32).
    """

    def __init__(self, q, ks, ws, gs, slot_k, run_start, state_from, first, live_slots):
        chunk, m = gs.shape
        rows, cols = _iota((chunk, chunk), 0), _iota((chunk, chunk), 1)
        self.same_run = (cols <= rows) & (first + cols >= run_start)  # [C, C]: write j is visible to query t
        self.uses_state = state_from < first  # [C, 1]: the carried state belongs to this row's run
        self.gamma = _dot((cols <= rows).astype(jnp.float32), gs)  # inclusive cumulative gates [C, m]
        middle = self.gamma[chunk // 2 - 1:chunk // 2, :]
        self.eq = jnp.exp(self.gamma - middle)  # query-side factor of exp(Gamma_t - Gamma_j)
        self.ek = jnp.exp(middle - self.gamma)  # key-side factor
        self.ed = jnp.where(self.uses_state, jnp.exp(self.gamma), 0.0)  # decay of the carried state
        self.wk = ws * self.ek
        self.qk = jnp.where(self.same_run, _dot_nt(q, ks), 0.0)  # [C, C]
        self.logits_state = self.ed * _dot_nt(q, slot_k)
        self.logits_intra = self.eq * _dot(self.qk, self.wk)
        logits = self.logits_state + self.logits_intra
        self.live = None if live_slots == m else _iota((chunk, m), 1) < live_slots
        self.logits = logits if self.live is None else jnp.where(self.live, logits, _MASKED)

    def read(self, p, slot_v, vs):
        """Slot read sum_i p[t, i] V~_t[i] for (unnormalised) slot probabilities p [C, m] -> [C, dv]."""
        pq = jnp.where(self.same_run, _dot_nt(p * self.eq, self.wk), 0.0)  # [C, C]
        return _dot(p * self.ed, slot_v) + _dot(pq, vs)


def _handover(gs, gamma, run_start, state_from, first):
    """How the chunk's state passes to the next: new = keep * decay_col * old + (s' * decay_to_last)^T @ (ks | vs).

    Returns keep [1, 1] (the carried state survives: the last row's run began before the chunk), decay_col [m, 1] =
    exp(Gamma_last), decay_to_last [C, m] = exp(Gamma_last - Gamma_j) on the last row's run, 0 before it.
    """
    chunk = gs.shape[0]
    keep = state_from[chunk - 1:, :] < first
    in_last_run = first + _iota((chunk, 1), 0) >= run_start[chunk - 1:, :]  # [C, 1]
    decay_to_last = jnp.where(in_last_run, jnp.exp(gamma[chunk - 1:, :] - gamma), 0.0)
    decay_col = jnp.exp(_dot_tn(gs, jnp.ones((chunk, 1), jnp.float32)))  # [m, 1]
    return keep, decay_col, decay_to_last


# ----------------------------------------------------------------------------------------------------------------
# Kernels.

def _forward_kernel(q_ref, qr_ref, kr_ref, v_ref, ks_ref, vs_ref, ws_ref, gs_ref, start_ref, from_ref, sk0_ref,
                    sv0_ref, o_ref, lse_ref, sk_chunks_ref, sv_chunks_ref, sk_last_ref, sv_last_ref,
                    sk_scr, sv_scr, max_scr, sum_scr, acc_scr, *, window, chunk, key_blocks, live_slots):
    c, kb = pl.program_id(2), pl.program_id(3)
    first = c * chunk
    run_start = start_ref[0]

    @pl.when((c == 0) & (kb == 0))
    def _load_initial_state():
        sk_scr[...] = sk0_ref[0, 0]
        sv_scr[...] = sv0_ref[0, 0]

    @pl.when(kb == 0)
    def _slot_branch():
        slot_k, slot_v = sk_scr[...], sv_scr[...]
        sk_chunks_ref[0, 0, 0] = slot_k
        sv_chunks_ref[0, 0, 0] = slot_v
        q = q_ref[0, 0].astype(jnp.float32)
        ks, vs = ks_ref[0, 0].astype(jnp.float32), vs_ref[0, 0].astype(jnp.float32)
        ws, gs = ws_ref[0, 0], gs_ref[0, 0]
        slots = _SlotChunk(q, ks, ws, gs, slot_k, run_start, from_ref[0], first, live_slots)
        row_max = jnp.max(slots.logits, axis=1, keepdims=True)
        p = jnp.exp(slots.logits - row_max)
        if slots.live is not None:
            p = jnp.where(slots.live, p, 0.0)
        max_scr[...] = row_max
        sum_scr[...] = jnp.sum(p, axis=1, keepdims=True)
        acc_scr[...] = slots.read(p, slot_v, vs)
        keep, decay_col, decay_to_last = _handover(gs, slots.gamma, run_start, from_ref[0], first)
        carry = ws * decay_to_last
        new_k = jnp.where(keep, decay_col * slot_k, 0.0) + _dot_tn(carry, ks)
        new_v = jnp.where(keep, decay_col * slot_v, 0.0) + _dot_tn(carry, vs)
        sk_scr[...] = new_k
        sv_scr[...] = new_v

        @pl.when(c == pl.num_programs(2) - 1)
        def _final_state():
            sk_last_ref[0, 0] = new_k
            sv_last_ref[0, 0] = new_v

    if window > 0:
        key_chunk = c - (key_blocks - 1) + kb

        @pl.when(key_chunk >= 0)
        def _window_block():
            mask = _window_mask(first, key_chunk * chunk, run_start, chunk, window)
            logits = jnp.where(mask, _dot_nt(qr_ref[0, 0], kr_ref[0, 0]), _MASKED)
            old_max = max_scr[...]
            new_max = jnp.maximum(old_max, jnp.max(logits, axis=1, keepdims=True))
            rescale = jnp.exp(old_max - new_max)
            p = jnp.where(mask, jnp.exp(logits - new_max), 0.0)
            values = v_ref[0, 0]
            max_scr[...] = new_max
            sum_scr[...] = rescale * sum_scr[...] + jnp.sum(p, axis=1, keepdims=True)
            acc_scr[...] = rescale * acc_scr[...] + _dot(p.astype(values.dtype), values)

    @pl.when(kb == key_blocks - 1)
    def _finish():
        total = sum_scr[...]
        o_ref[0, 0] = (acc_scr[...] / total).astype(o_ref.dtype)
        lse_ref[0, 0] = max_scr[...] + jnp.log(total)


def _slot_backward_kernel(q_ref, ks_ref, vs_ref, ws_ref, gs_ref, start_ref, from_ref, sk_ref, sv_ref, do_ref,
                          lse_ref, delta_ref, dsk_last_ref, dsv_last_ref,
                          dq_ref, dks_ref, dvs_ref, dws_ref, dgs_ref, dsk0_ref, dsv0_ref,
                          dsk_scr, dsv_scr, *, chunk, live_slots):
    step = pl.program_id(2)
    c = pl.num_programs(2) - 1 - step  # chunks run last to first
    first = c * chunk
    run_start, state_from = start_ref[0], from_ref[0]

    @pl.when(step == 0)
    def _load_final_state_gradient():
        dsk_scr[...] = dsk_last_ref[0, 0]
        dsv_scr[...] = dsv_last_ref[0, 0]

    q = q_ref[0, 0].astype(jnp.float32)
    ks, vs = ks_ref[0, 0].astype(jnp.float32), vs_ref[0, 0].astype(jnp.float32)
    ws, gs = ws_ref[0, 0], gs_ref[0, 0]
    slot_k, slot_v = sk_ref[0, 0, 0], sv_ref[0, 0, 0]
    d_out = do_ref[0, 0].astype(jnp.float32)
    slots = _SlotChunk(q, ks, ws, gs, slot_k, run_start, state_from, first, live_slots)
    p = jnp.exp(slots.logits - lse_ref[0, 0])
    if slots.live is not None:
        p = jnp.where(slots.live, p, 0.0)

    # Slot read o_s = (p * ed) @ V + M.((p * eq) @ wk^T) @ vs.
    p_state, p_intra = p * slots.ed, p * slots.eq
    read_weights = jnp.where(slots.same_run, _dot_nt(p_intra, slots.wk), 0.0)  # [C, C]
    d_read_weights = jnp.where(slots.same_run, _dot_nt(d_out, vs), 0.0)
    d_p_state = _dot_nt(d_out, slot_v)
    d_p_intra = _dot(d_read_weights, slots.wk)
    d_wk = _dot_tn(d_read_weights, p_intra)
    d_vs = _dot_tn(read_weights, d_out)
    d_slot_v = _dot_tn(p_state, d_out)
    d_gamma = d_p_state * p_state + d_p_intra * p_intra

    # Softmax, then the slot logits a = ed * (q @ K^T) + eq * (M.(q @ ks^T) @ wk).
    d_logits = p * (slots.ed * d_p_state + slots.eq * d_p_intra - delta_ref[0, 0])
    d_gamma += d_logits * (slots.logits_state + slots.logits_intra)
    d_logits_state = d_logits * slots.ed
    d_logits_intra = d_logits * slots.eq
    d_qk = jnp.where(slots.same_run, _dot_nt(d_logits_intra, slots.wk), 0.0)
    d_q = _dot(d_logits_state, slot_k) + _dot(d_qk, ks)
    d_ks = _dot_tn(d_qk, q)
    d_wk += _dot_tn(slots.qk, d_logits_intra)
    d_slot_k = _dot_tn(d_logits_state, q)

    # The hand-over to the next chunk: new = keep * decay_col * old + carry^T @ (ks | vs).
    d_next_k, d_next_v = dsk_scr[...], dsv_scr[...]
    keep, decay_col, decay_to_last = _handover(gs, slots.gamma, run_start, state_from, first)
    carry = ws * decay_to_last
    d_carry = _dot_nt(ks, d_next_k) + _dot_nt(vs, d_next_v)  # [C, m]
    d_ks += _dot(carry, d_next_k)
    d_vs += _dot(carry, d_next_v)
    d_carry_gate = d_carry * carry
    kept_mass = jnp.where(keep, decay_col * (jnp.sum(d_next_k * slot_k, axis=1, keepdims=True)
                                             + jnp.sum(d_next_v * slot_v, axis=1, keepdims=True)), 0.0)  # [m, 1]
    last_row = _iota((chunk, 1), 0) == chunk - 1
    d_gamma_last = (jnp.sum(d_carry_gate, axis=0, keepdims=True)
                    + _dot_tn(kept_mass, jnp.eye(kept_mass.shape[0], dtype=jnp.float32)))  # [1, m]
    d_gamma += jnp.where(last_row, d_gamma_last, 0.0) - d_carry_gate - d_wk * slots.wk

    rows, cols = _iota((chunk, chunk), 0), _iota((chunk, chunk), 1)
    dgs_ref[0, 0] = _dot_tn((cols <= rows).astype(jnp.float32), d_gamma)  # reverse cumulative sum
    dws_ref[0, 0] = d_wk * slots.ek + d_carry * decay_to_last
    dq_ref[0, 0] = d_q
    dks_ref[0, 0] = d_ks
    dvs_ref[0, 0] = d_vs
    d_prev_k = d_slot_k + jnp.where(keep, decay_col * d_next_k, 0.0)
    d_prev_v = d_slot_v + jnp.where(keep, decay_col * d_next_v, 0.0)
    dsk_scr[...] = d_prev_k
    dsv_scr[...] = d_prev_v

    @pl.when(c == 0)
    def _initial_state_gradient():
        dsk0_ref[0, 0] = d_prev_k
        dsv0_ref[0, 0] = d_prev_v


def _window_probs(qr_ref, kr_ref, lse_ref, start_ref, query_chunk, key_chunk, chunk, window):
    """Window probabilities of one (query chunk, key chunk) block, [C, C] float32, and its mask."""
    mask = _window_mask(query_chunk * chunk, key_chunk * chunk, start_ref[0], chunk, window)
    logits = _dot_nt(qr_ref[0, 0], kr_ref[0, 0])
    return jnp.where(mask, jnp.exp(logits - lse_ref[0, 0]), 0.0)


def _window_dq_kernel(qr_ref, kr_ref, v_ref, do_ref, lse_ref, delta_ref, start_ref, dqr_ref, acc_scr, *,
                      window, chunk, key_blocks):
    c, kb = pl.program_id(2), pl.program_id(3)
    key_chunk = c - (key_blocks - 1) + kb

    @pl.when(kb == 0)
    def _zero():
        acc_scr[...] = jnp.zeros_like(acc_scr)

    @pl.when(key_chunk >= 0)
    def _accumulate():
        p = _window_probs(qr_ref, kr_ref, lse_ref, start_ref, c, key_chunk, chunk, window)
        d_logits = p * (_dot_nt(do_ref[0, 0], v_ref[0, 0]) - delta_ref[0, 0])
        keys = kr_ref[0, 0]
        acc_scr[...] += _dot(d_logits.astype(keys.dtype), keys)

    @pl.when(kb == key_blocks - 1)
    def _store():
        dqr_ref[0, 0] = acc_scr[...]


def _window_dkv_kernel(qr_ref, kr_ref, v_ref, do_ref, lse_ref, delta_ref, start_ref, dkr_ref, dv_ref,
                       dk_scr, dv_scr, *, window, chunk, key_blocks):
    kc, qb = pl.program_id(2), pl.program_id(3)
    query_chunk = kc + qb

    @pl.when(qb == 0)
    def _zero():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    @pl.when(query_chunk < pl.num_programs(2))
    def _accumulate():
        p = _window_probs(qr_ref, kr_ref, lse_ref, start_ref, query_chunk, kc, chunk, window)
        d_out = do_ref[0, 0]
        d_logits = p * (_dot_nt(d_out, v_ref[0, 0]) - delta_ref[0, 0])
        queries = qr_ref[0, 0]
        dv_scr[...] += _dot_tn(p.astype(d_out.dtype), d_out)
        dk_scr[...] += _dot_tn(d_logits.astype(queries.dtype), queries)

    @pl.when(qb == key_blocks - 1)
    def _store():
        dkr_ref[0, 0] = dk_scr[...]
        dv_ref[0, 0] = dv_scr[...]


# ----------------------------------------------------------------------------------------------------------------
# pallas_call wrappers. Core layout: q, qr [B, H, Tp, dk]; kr, ks [B, Hkv, Tp, dk]; v, vs [B, Hkv, Tp, dv];
# ws, gs [B, Hkv, Tp, m] float32; run_start, state_from [B, Tp, 1] int32; slot_k0 [B, Hkv, m, dk] float32.

def _key_blocks(window, chunk, num_chunks):
    """How many key chunks cover a query chunk's window: ceil((W - 1) / C) + 1, at most all chunks."""
    return 1 if window == 0 else min(num_chunks, -(-(window - 1) // chunk) + 1)


def _compiler_params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _forward(q, qr, kr, v, ks, vs, ws, gs, run_start, state_from, sk0, sv0, window, chunk, live_slots, interpret):
    B, H, Tp, dk = q.shape
    group = H // kr.shape[1]
    dv, m = v.shape[3], ws.shape[3]
    nc = Tp // chunk
    nkb = _key_blocks(window, chunk, nc)
    key_chunk = lambda c, kb: jnp.maximum(c - (nkb - 1) + kb, 0)
    rows = lambda d: pl.BlockSpec((1, 1, chunk, d), lambda b, h, c, kb: (b, h, c, 0))
    kv_rows = lambda d: pl.BlockSpec((1, 1, chunk, d), lambda b, h, c, kb: (b, h // group, c, 0))
    window_rows = lambda d: pl.BlockSpec((1, 1, chunk, d), lambda b, h, c, kb: (b, h // group, key_chunk(c, kb), 0))
    column = pl.BlockSpec((1, chunk, 1), lambda b, h, c, kb: (b, c, 0))
    state = lambda d: pl.BlockSpec((1, 1, m, d), lambda b, h, c, kb: (b, h // group, 0, 0))
    head_state = lambda d: pl.BlockSpec((1, 1, m, d), lambda b, h, c, kb: (b, h, 0, 0))
    chunk_state = lambda d: pl.BlockSpec((1, 1, 1, m, d), lambda b, h, c, kb: (b, h, c, 0, 0))
    f32 = jnp.float32
    kernel = functools.partial(_forward_kernel, window=window, chunk=chunk, key_blocks=nkb, live_slots=live_slots)
    return pl.pallas_call(
        kernel,
        grid=(B, H, nc, nkb),
        in_specs=[rows(dk), rows(dk), window_rows(dk), window_rows(dv), kv_rows(dk), kv_rows(dv), kv_rows(m),
                  kv_rows(m), column, column, state(dk), state(dv)],
        out_specs=[rows(dv), rows(1), chunk_state(dk), chunk_state(dv), head_state(dk), head_state(dv)],
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, dv), q.dtype), jax.ShapeDtypeStruct((B, H, Tp, 1), f32),
                   jax.ShapeDtypeStruct((B, H, nc, m, dk), f32), jax.ShapeDtypeStruct((B, H, nc, m, dv), f32),
                   jax.ShapeDtypeStruct((B, H, m, dk), f32), jax.ShapeDtypeStruct((B, H, m, dv), f32)],
        scratch_shapes=[pltpu.VMEM((m, dk), f32), pltpu.VMEM((m, dv), f32), pltpu.VMEM((chunk, 1), f32),
                        pltpu.VMEM((chunk, 1), f32), pltpu.VMEM((chunk, dv), f32)],
        compiler_params=_compiler_params("parallel", "parallel", "arbitrary", "arbitrary"),
        interpret=interpret,
        name="nha_tpu_forward",
    )(q, qr, kr, v, ks, vs, ws, gs, run_start, state_from, sk0, sv0)


def _slot_backward(q, ks, vs, ws, gs, run_start, state_from, sk_chunks, sv_chunks, d_out, lse, delta, dsk_last,
                   dsv_last, chunk, live_slots, interpret):
    B, H, Tp, dk = q.shape
    group = H // ks.shape[1]
    dv, m = vs.shape[3], ws.shape[3]
    nc = Tp // chunk
    reverse = lambda s: nc - 1 - s
    rows = lambda d: pl.BlockSpec((1, 1, chunk, d), lambda b, h, s: (b, h, reverse(s), 0))
    kv_rows = lambda d: pl.BlockSpec((1, 1, chunk, d), lambda b, h, s: (b, h // group, reverse(s), 0))
    column = pl.BlockSpec((1, chunk, 1), lambda b, h, s: (b, reverse(s), 0))
    chunk_state = lambda d: pl.BlockSpec((1, 1, 1, m, d), lambda b, h, s: (b, h, reverse(s), 0, 0))
    head_state = lambda d: pl.BlockSpec((1, 1, m, d), lambda b, h, s: (b, h, 0, 0))
    f32 = jnp.float32
    per_head = lambda d: jax.ShapeDtypeStruct((B, H, Tp, d), f32)
    kernel = functools.partial(_slot_backward_kernel, chunk=chunk, live_slots=live_slots)
    return pl.pallas_call(
        kernel,
        grid=(B, H, nc),
        in_specs=[rows(dk), kv_rows(dk), kv_rows(dv), kv_rows(m), kv_rows(m), column, column, chunk_state(dk),
                  chunk_state(dv), rows(dv), rows(1), rows(1), head_state(dk), head_state(dv)],
        out_specs=[rows(dk), rows(dk), rows(dv), rows(m), rows(m), head_state(dk), head_state(dv)],
        out_shape=[per_head(dk), per_head(dk), per_head(dv), per_head(m), per_head(m),
                   jax.ShapeDtypeStruct((B, H, m, dk), f32), jax.ShapeDtypeStruct((B, H, m, dv), f32)],
        scratch_shapes=[pltpu.VMEM((m, dk), f32), pltpu.VMEM((m, dv), f32)],
        compiler_params=_compiler_params("parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="nha_tpu_slot_backward",
    )(q, ks, vs, ws, gs, run_start, state_from, sk_chunks, sv_chunks, d_out, lse, delta, dsk_last, dsv_last)


def _window_backward(qr, kr, v, d_out, lse, delta, run_start, window, chunk, interpret):
    B, H, Tp, dk = qr.shape
    group = H // kr.shape[1]
    dv = v.shape[3]
    nc = Tp // chunk
    nkb = _key_blocks(window, chunk, nc)
    f32 = jnp.float32
    # dq: query chunk c against its key chunks c - nkb + 1 .. c.
    key_chunk = lambda c, kb: jnp.maximum(c - (nkb - 1) + kb, 0)
    q_rows = lambda d: pl.BlockSpec((1, 1, chunk, d), lambda b, h, c, kb: (b, h, c, 0))
    k_rows = lambda d: pl.BlockSpec((1, 1, chunk, d), lambda b, h, c, kb: (b, h // group, key_chunk(c, kb), 0))
    q_column = pl.BlockSpec((1, chunk, 1), lambda b, h, c, kb: (b, c, 0))
    d_qr = pl.pallas_call(
        functools.partial(_window_dq_kernel, window=window, chunk=chunk, key_blocks=nkb),
        grid=(B, H, nc, nkb),
        in_specs=[q_rows(dk), k_rows(dk), k_rows(dv), q_rows(dv), q_rows(1), q_rows(1), q_column],
        out_specs=q_rows(dk),
        out_shape=jax.ShapeDtypeStruct((B, H, Tp, dk), f32),
        scratch_shapes=[pltpu.VMEM((chunk, dk), f32)],
        compiler_params=_compiler_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="nha_tpu_window_dq",
    )(qr, kr, v, d_out, lse, delta, run_start)
    # dk, dv: key chunk kc against the query chunks kc .. kc + nkb - 1 that see it.
    query_chunk = lambda kc, qb: jnp.minimum(kc + qb, nc - 1)
    q_rows = lambda d: pl.BlockSpec((1, 1, chunk, d), lambda b, h, kc, qb: (b, h, query_chunk(kc, qb), 0))
    k_rows = lambda d: pl.BlockSpec((1, 1, chunk, d), lambda b, h, kc, qb: (b, h // group, kc, 0))
    out_rows = lambda d: pl.BlockSpec((1, 1, chunk, d), lambda b, h, kc, qb: (b, h, kc, 0))
    q_column = pl.BlockSpec((1, chunk, 1), lambda b, h, kc, qb: (b, query_chunk(kc, qb), 0))
    d_kr, d_v = pl.pallas_call(
        functools.partial(_window_dkv_kernel, window=window, chunk=chunk, key_blocks=nkb),
        grid=(B, H, nc, nkb),
        in_specs=[q_rows(dk), k_rows(dk), k_rows(dv), q_rows(dv), q_rows(1), q_rows(1), q_column],
        out_specs=[out_rows(dk), out_rows(dv)],
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, dk), f32), jax.ShapeDtypeStruct((B, H, Tp, dv), f32)],
        scratch_shapes=[pltpu.VMEM((chunk, dk), f32), pltpu.VMEM((chunk, dv), f32)],
        compiler_params=_compiler_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="nha_tpu_window_dkv",
    )(qr, kr, v, d_out, lse, delta, run_start)
    return d_qr, d_kr, d_v


# ----------------------------------------------------------------------------------------------------------------
# The differentiable core.

@functools.partial(jax.custom_vjp, nondiff_argnums=(12, 13, 14, 15))
def _core(q, qr, kr, v, ks, vs, ws, gs, run_start, state_from, sk0, sv0, window, chunk, live_slots, interpret):
    """Core NHA in the kernel layout. Returns (out [B, H, Tp, dv], slot_k [B, H, m, dk], slot_v [B, H, m, dv])."""
    out, _, _, _, sk_last, sv_last = _forward(q, qr, kr, v, ks, vs, ws, gs, run_start, state_from, sk0, sv0,
                                              window, chunk, live_slots, interpret)
    return out, sk_last, sv_last


def _core_fwd(q, qr, kr, v, ks, vs, ws, gs, run_start, state_from, sk0, sv0, window, chunk, live_slots, interpret):
    out, lse, sk_chunks, sv_chunks, sk_last, sv_last = _forward(
        q, qr, kr, v, ks, vs, ws, gs, run_start, state_from, sk0, sv0, window, chunk, live_slots, interpret)
    out, lse, sk_chunks, sv_chunks = name_residuals(out, lse, sk_chunks, sv_chunks)
    residuals = (q, qr, kr, v, ks, vs, ws, gs, run_start, state_from, sk0, sv0, out, lse, sk_chunks, sv_chunks)
    return (out, sk_last, sv_last), residuals


def _core_bwd(window, chunk, live_slots, interpret, residuals, cotangents):
    q, qr, kr, v, ks, vs, ws, gs, run_start, state_from, sk0, sv0, out, lse, sk_chunks, sv_chunks = residuals
    d_out, dsk_last, dsv_last = cotangents
    B, H = q.shape[:2]
    Hkv = kr.shape[1]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_out = d_out.astype(q.dtype)
    dq, dks, dvs, dws, dgs, dsk0, dsv0 = _slot_backward(
        q, ks, vs, ws, gs, run_start, state_from, sk_chunks, sv_chunks, d_out, lse, delta,
        dsk_last.astype(jnp.float32), dsv_last.astype(jnp.float32), chunk, live_slots, interpret)
    group_sum = lambda x: x.reshape((B, Hkv, H // Hkv) + x.shape[2:]).sum(axis=2)
    if window > 0:
        dqr, dkr, dv = _window_backward(qr, kr, v, d_out, lse, delta, run_start, window, chunk, interpret)
        dkr, dv = group_sum(dkr), group_sum(dv)
    else:
        dqr, dkr, dv = jnp.zeros_like(qr), jnp.zeros_like(kr), jnp.zeros_like(v)
    cast = lambda x, like: x.astype(like.dtype)
    return (cast(dq, q), cast(dqr, qr), cast(dkr, kr), cast(dv, v), cast(group_sum(dks), ks),
            cast(group_sum(dvs), vs), group_sum(dws), group_sum(dgs), None, None, group_sum(dsk0), group_sum(dsv0))


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Launcher.

def _delay(x, steps):
    """x [B, T, ...] shifted later in time by `steps` (zeros enter at the front)."""
    T = x.shape[1]
    steps = min(steps, T)
    return jnp.pad(x[:, :T - steps], [(0, 0), (steps, 0)] + [(0, 0)] * (x.ndim - 2))


def _check_args(q, k, v, log_alpha, segment_ids, positions, slot_k0, slot_v0, window, rope_theta, chunk_size):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or log_alpha.ndim != 4:
        raise ValueError("q, k, v, log_alpha must be 4-D: [B, T, H, dk], [B, T, Hkv, dk], [B, T, Hkv, dv], "
                         f"[B, T, Hkv, m]; got {q.shape}, {k.shape}, {v.shape}, {log_alpha.shape}.")
    B, T, H, dk = q.shape
    Hkv, dv, m = k.shape[2], v.shape[3], log_alpha.shape[3]
    if k.shape != (B, T, Hkv, dk) or v.shape[:3] != (B, T, Hkv) or log_alpha.shape[:3] != (B, T, Hkv):
        raise ValueError(f"k, v, log_alpha must share q's batch and time and k's heads; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}, log_alpha {log_alpha.shape}.")
    if H % Hkv:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the kv heads ({Hkv}).")
    if not isinstance(window, int) or window < 0 or window + m < 1:
        raise ValueError(f"window must be an int >= 0 with window + m >= 1; got window={window!r}, m={m}.")
    if rope_theta is not None and dk % 2:
        raise ValueError(f"RoPE needs an even dk; got dk={dk} (pass rope_theta=None to switch it off).")
    if segment_ids.shape != (B, T) or positions.shape != (B, T):
        raise ValueError(f"segment_ids and positions must be [B, T] = {(B, T)}; got {segment_ids.shape} and "
                         f"{positions.shape}.")
    for name, state, d in (("slot_k0", slot_k0, dk), ("slot_v0", slot_v0, dv)):
        if state is not None and state.shape != (B, Hkv, m, d):
            raise ValueError(f"{name} must be [B, Hkv, m, {'dk' if d == dk else 'dv'}] = {(B, Hkv, m, d)}; "
                             f"got {state.shape}.")
    if chunk_size is not None and (chunk_size < 16 or chunk_size % 16):
        raise ValueError(f"chunk_size must be a multiple of 16 (the bf16 sublane tile); got {chunk_size}.")


def nha_attention_tpu(q, k, v, log_alpha, segment_ids, positions, slot_k0=None, slot_v0=None, *, window, scale,
                      rope_theta, return_slots=False, interpret=False, chunk_size=None):
    """Native Hybrid Attention with the Mosaic TPU kernels (differentiable w.r.t. all float inputs).

    Args:
      q: [B, T, H, dk]; k: [B, T, Hkv, dk]; v: [B, T, Hkv, dv] (bf16 or float32); H % Hkv == 0.
      log_alpha: [B, T, Hkv, m] float32, <= 0 (decay gates; the write strength is 1 - exp(log_alpha)).
      segment_ids: int32 [B, T] run ids, non-decreasing along T (-1 only for dummy tokens before run 0).
      positions: int32 [B, T] RoPE positions.
      slot_k0: [B, Hkv, m, dk], slot_v0: [B, Hkv, m, dv] float32 or None (zeros): the slot state seen by run 0.
      window: int W >= 0 (window + m >= 1). scale: logit scale (None = dk ** -0.5). rope_theta: RoPE base or None.
      return_slots: also return the slot state after token T - 1.
      interpret: False, True or a pltpu.InterpretParams: run the kernels in interpret mode (CPU).
      chunk_size: rows per kernel block (multiple of 16); None picks from the table by head dim.
    Returns:
      out [B, T, H, dv] in q.dtype; with return_slots, (out, slot_k [B, Hkv, m, dk], slot_v [B, Hkv, m, dv]).
    """
    _check_args(q, k, v, log_alpha, segment_ids, positions, slot_k0, slot_v0, window, rope_theta, chunk_size)
    B, T, H, dk = q.shape
    Hkv, dv, m = k.shape[2], v.shape[3], log_alpha.shape[3]
    chunk = chunk_size or default_chunk_size(max(dk, dv))
    scale = dk ** -0.5 if scale is None else scale
    segment_ids, positions = segment_ids.astype(jnp.int32), positions.astype(jnp.int32)
    log_alpha = log_alpha.astype(jnp.float32)
    slot_k0 = jnp.zeros((B, Hkv, m, dk), jnp.float32) if slot_k0 is None else slot_k0.astype(jnp.float32)
    slot_v0 = jnp.zeros((B, Hkv, m, dv), jnp.float32) if slot_v0 is None else slot_v0.astype(jnp.float32)

    # Slot inputs: step t writes token t - W, if that token is in t's run.
    t = jnp.arange(T, dtype=jnp.int32)
    feeds = (t >= window)[None, :] & (_delay(segment_ids, window) == segment_ids)  # [B, T]
    gates_in = jnp.where(feeds[..., None, None], _delay(log_alpha, window), 0.0)
    write_in = -jnp.expm1(gates_in)
    keys_in, values_in = _delay(k, window), _delay(v, window)
    q_scaled = q.astype(jnp.float32) * scale  # one rounding to q.dtype per kernel input, after RoPE and scale
    q_slot = q_scaled.astype(q.dtype)
    q_rot = (q_scaled if rope_theta is None else rope(q_scaled, positions, rope_theta)).astype(q.dtype)
    k_rot = k if rope_theta is None else rope(k, positions, rope_theta).astype(k.dtype)

    # An empty slot set still needs one (masked) slot column to keep every block non-empty.
    live_slots = m
    if m == 0:
        pad_slots = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, 1), (0, 0)])
        gates_in, write_in = (jnp.zeros(x.shape[:-1] + (1,), jnp.float32) for x in (gates_in, write_in))
        slot_k0, slot_v0 = pad_slots(slot_k0), pad_slots(slot_v0)

    # Pad time to whole chunks: padded steps continue the last run and write nothing, so the final state is kept.
    Tp = -(-T // chunk) * chunk
    pad_time = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))
    segs = jnp.pad(segment_ids, [(0, 0), (0, Tp - T)], mode="edge")
    tp = jnp.arange(Tp, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segs[:, 1:] != segs[:, :-1]], axis=1)
    run_start = jax.lax.cummax(jnp.where(starts, tp, 0), axis=1)
    state_from = jnp.where(segs == 0, -1, run_start)  # run 0 continues the carried-in state

    heads_first = lambda x: jnp.swapaxes(pad_time(x), 1, 2)
    out, slot_k, slot_v = _core(
        heads_first(q_slot), heads_first(q_rot), heads_first(k_rot), heads_first(v), heads_first(keys_in),
        heads_first(values_in), heads_first(write_in), heads_first(gates_in), run_start[..., None],
        state_from[..., None], slot_k0, slot_v0, window, chunk, live_slots, interpret)
    out = jnp.swapaxes(out, 1, 2)[:, :T]
    if not return_slots:
        return out
    group = H // Hkv
    return out, slot_k[:, ::group, :live_slots], slot_v[:, ::group, :live_slots]
