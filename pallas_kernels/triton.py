"""NHA attention on GPU: Pallas kernels with the Triton lowering, their launcher and the custom_vjp.

Layout of the computation (NHA_SPEC sections 1 and 3):
- XLA prepares the inputs once: pads T to a multiple of the chunk and the head/slot dims to powers of two, applies
  RoPE to the window copies of q and k, shifts the slot inputs by W (k'_p = k_{p-W}: token j is written at step
  j + W) and zeroes the writes that would cross a change of run id, and takes chunk-local cumulative gates G.
  Everything here is differentiated by XLA, so the kernels only see the "core" problem below.
- `_state_kernel`, grid (B, Hkv, dk/dv slices), sequential over chunks: the slot states H^k_c [dk, m] and
  H^v_c [m, dv] that enter each chunk (float32, in HBM), and the final state.
- `_output_kernel`, grid (B, H, T/C), fully parallel: walks its chunk in sub-blocks of 16 rows carrying the slot
  state, so every gate exponent is <= 0; per sub-block: slot logits (state + a [16, 16, m] block of pairs), window
  logits over key blocks with an online softmax, one float32 softmax over both, slot read, window read.
- The backward pass recomputes: it differentiates `_core_xla`, the same chunked algorithm written in XLA
  (checkpointed per chunk, so no T x (m + W) array is kept).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.rope import rope
from pallas_kernels.tuning import triton_config

# A finite "minus infinity": exp() of it underflows to 0 and differences of it never make NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Triton tensors need power-of-two shapes and tl.dot needs every dimension >= 16.
_MIN_DIM = 16


def _pow2_at_least(n: int, floor: int = _MIN_DIM) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def _compiler_params(num_warps: int, num_stages: int):
    # jax 0.10/0.11 name it CompilerParams; older releases TritonCompilerParams.
    params_cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return params_cls(num_warps=num_warps, num_stages=num_stages)


def _dot(a, b, *, trans_a=False, trans_b=False):
    """Matrix product with float32 accumulation; float32 operands stay exact (no tf32)."""
    a, b = (a.T if trans_a else a), (b.T if trans_b else b)
    precision = None
    if a.dtype == jnp.float32 or b.dtype == jnp.float32:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        precision = jax.lax.Precision.HIGHEST
    # plgpu.dot exists in jax 0.10; pl.dot is gone from jax 0.11, where jnp.dot lowers directly.
    if hasattr(plgpu, "dot"):
        return plgpu.dot(a, b, precision=precision).astype(jnp.float32)
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Kernels.


def _state_kernel(ks_ref, vs_ref, gates_ref, writes_ref, run_ref, hk0_ref, hv0_ref,
                  hk_ref, hv_ref, hk_final_ref, hv_final_ref, *, chunk, num_chunks):
    """One (batch, kv head, slice of dk and dv): H^k/H^v entering every chunk, and after the last one.

    ks [Tp, dk], vs [Tp, dv] shifted keys/values; gates [Tp, m] chunk-local cumulative shifted log gates; writes
    [Tp, m] shifted write strengths (0 where nothing is written); run [Tp] slot run ids (non-decreasing);
    hk0 [dk, m], hv0 [m, dv] initial state (belongs to run 0). Outputs hk [nC, dk, m], hv [nC, m, dv], finals
    (dk and dv here are this program's slices).
    """
    compute_dtype = ks_ref.dtype

    def body(c, carry):
        hk, hv, state_run = carry
        hk_ref[c, :, :] = hk
        hv_ref[c, :, :] = hv
        rows = pl.ds(c * chunk, chunk)
        last = c * chunk + chunk - 1
        run = run_ref[rows]
        last_run = run_ref[last]
        gates = gates_ref[rows, :]
        gate_last = gates_ref[last, :]
        # Tokens of an earlier run in this chunk never reach the state that leaves it; the state that entered
        # survives only if its run continues to the chunk's end (runs are contiguous).
        weights = writes_ref[rows, :] * jnp.exp(gate_last[None, :] - gates)
        weights = jnp.where((run == last_run)[:, None], weights, 0.0)
        decay = jnp.where(state_run == last_run, jnp.exp(gate_last), 0.0)
        weights = weights.astype(compute_dtype)
        hk = hk * decay[None, :] + _dot(ks_ref[rows, :], weights, trans_a=True)
        hv = hv * decay[:, None] + _dot(weights, vs_ref[rows, :], trans_a=True)
        return hk, hv, last_run

    init = (hk0_ref[...], hv0_ref[...], jnp.int32(0))
    hk, hv, _ = jax.lax.fori_loop(0, num_chunks, body, init)
    hk_final_ref[...] = hk
    hv_final_ref[...] = hv


def _output_kernel(q_ref, qr_ref, ks_ref, vs_ref, gates_ref, writes_ref, hk_ref, hv_ref,
                   kr_ref, v_ref, seg_ref, run_ref, o_ref, *,
                   chunk, sub, key_block, window, num_slots, scale):
    """One (batch, query head, chunk of C queries): the NHA output of those queries.

    q/qr [C, dk] query (plain for slots, RoPE'd for the window); ks [C, dk], vs [C, dv], gates [C, m], writes
    [C, m] this chunk's shifted slot inputs; hk [dk, m], hv [m, dv] the state entering the chunk; kr [Tp, dk],
    v [Tp, dv] the whole (RoPE'd) keys and values of this kv head; seg [Tp] window run ids, run [Tp] slot run ids.
    Output o [C, dv].

    The chunk is walked in sub-blocks of `sub` rows, carrying the slot state from one to the next, so that every
    gate factor is exp of a non-positive number: exp(G_t - G_base) for the state entering the sub-block, and
    exp(G_t - G_p), p <= t, for the [sub, sub, m] block of pairs inside it.
    """
    c = pl.program_id(2)
    c0 = c * chunk
    rows = jnp.arange(sub)
    m_pad = gates_ref.shape[-1]
    slot_valid = (jnp.arange(m_pad) < num_slots)[None, :]
    causal = rows[:, None] >= rows[None, :]
    dtype = q_ref.dtype

    if num_slots > 0:
        hk, hv = hk_ref[...], hv_ref[...]
        state_run = jnp.where(c > 0, run_ref[jnp.maximum(c0 - 1, 0)], 0)
    for r0 in range(0, chunk, sub):
        blk = pl.ds(r0, sub)
        t0 = c0 + r0
        t_idx = t0 + rows
        seg_q = seg_ref[pl.ds(t0, sub)]
        acc = jnp.zeros((sub, o_ref.shape[-1]), jnp.float32)

        if num_slots > 0:
            q = q_ref[blk, :]
            run_q = run_ref[pl.ds(t0, sub)]
            gates = gates_ref[blk, :]
            writes = writes_ref[blk, :]
            base = gates_ref[r0 - 1, :] if r0 > 0 else jnp.zeros((m_pad,), jnp.float32)
            # The state entering the sub-block reaches query t only if t's run began before the sub-block.
            inter_gate = jnp.where((run_q == state_run)[:, None], jnp.exp(gates - base[None, :]), 0.0)
            pair_visible = (causal & (run_q[:, None] == run_q[None, :]))[:, :, None]

            def pair_weights():
                """[t, p, m]: s_p exp(G_t - G_p) for p <= t in t's run, else 0."""
                decay = jnp.exp(jnp.minimum(gates[:, None, :] - gates[None, :, :], 0.0)) * writes[None, :, :]
                return jnp.where(pair_visible, decay, 0.0)

            qk = _dot(q, ks_ref[blk, :], trans_b=True)
            logits = _dot(q, hk.astype(dtype)) * inter_gate + jnp.sum(qk[:, :, None] * pair_weights(), axis=1)
            logits = jnp.where(slot_valid, logits * scale, _MASK_VALUE)
            row_max = jnp.max(logits, axis=1)
            row_sum = jnp.sum(jnp.where(slot_valid, jnp.exp(logits - row_max[:, None]), 0.0), axis=1)
        else:
            row_max = jnp.full((sub,), _MASK_VALUE, jnp.float32)
            row_sum = jnp.zeros((sub,), jnp.float32)

        if window > 0:
            qr = qr_ref[blk, :]
            key_rows = jnp.arange(key_block)

            def window_step(kb, carry):
                acc, row_max, row_sum = carry
                cols = pl.ds(kb * key_block, key_block)
                j_idx = kb * key_block + key_rows
                visible = ((j_idx[None, :] <= t_idx[:, None]) & (j_idx[None, :] > t_idx[:, None] - window)
                           & (seg_ref[cols][None, :] == seg_q[:, None]))
                s = jnp.where(visible, _dot(qr, kr_ref[cols, :], trans_b=True) * scale, _MASK_VALUE)
                new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
                correction = jnp.exp(row_max - new_max)
                probs = jnp.where(visible, jnp.exp(s - new_max[:, None]), 0.0)
                acc = acc * correction[:, None] + _dot(probs.astype(dtype), v_ref[cols, :])
                return acc, new_max, row_sum * correction + jnp.sum(probs, axis=1)

            first = jnp.maximum(t0 - window + 1, 0) // key_block
            last = (t0 + sub - 1) // key_block
            acc, row_max, row_sum = jax.lax.fori_loop(first, last + 1, window_step, (acc, row_max, row_sum))

        if num_slots > 0:
            vs = vs_ref[blk, :]
            probs = jnp.where(slot_valid, jnp.exp(logits - row_max[:, None]), 0.0)
            pair_probs = jnp.sum(probs[:, None, :] * pair_weights(), axis=2)  # [t, p]
            acc += _dot((probs * inter_gate).astype(dtype), hv.astype(dtype))
            acc += _dot(pair_probs.astype(dtype), vs)
        o_ref[blk, :] = (acc / row_sum[:, None]).astype(o_ref.dtype)

        if num_slots > 0 and r0 + sub < chunk:
            # Advance the state over this sub-block (as _state_kernel does over a chunk).
            last_run = run_ref[t0 + sub - 1]
            gate_last = gates_ref[r0 + sub - 1, :]
            weights = writes * jnp.exp(gate_last[None, :] - gates)
            weights = jnp.where((run_q == last_run)[:, None], weights, 0.0).astype(dtype)
            decay = jnp.where(state_run == last_run, jnp.exp(gate_last - base), 0.0)
            hk = hk * decay[None, :] + _dot(ks_ref[blk, :], weights, trans_a=True)
            hv = hv * decay[:, None] + _dot(weights, vs, trans_a=True)
            state_run = last_run


# ----------------------------------------------------------------------------------------------------------------
# Launchers of the core problem (inputs prepared by `_prepare`).


def _slot_states(ks, vs, gates, writes, hk0, hv0, run, *, chunk, config, interpret):
    """Launches _state_kernel: (hk [B, Hkv, nC, dk, m], hv [B, Hkv, nC, m, dv], hk_final, hv_final), float32.

    The grid is (B, Hkv, splits): each program owns dk/splits rows of H^k and dv/splits columns of H^v, so that
    small batches still fill the GPU (the chunk loop inside a program is sequential).
    """
    batch, t_pad, kv_heads, dk = ks.shape
    dv, m = vs.shape[3], gates.shape[3]
    num_chunks = t_pad // chunk
    splits = max(1, min(config.state_splits, dk // _MIN_DIM, dv // _MIN_DIM))
    dk_part, dv_part = dk // splits, dv // splits

    def per_token(width, split):
        return pl.BlockSpec((None, t_pad, None, width), lambda b, g, i: (b, 0, g, i if split else 0))

    def per_head(*shape, split_axis):
        def index(b, g, i):
            return (b, g) + tuple(i if axis == split_axis else 0 for axis in range(len(shape)))
        return pl.BlockSpec((None, None, *shape), index)

    return pl.pallas_call(
        functools.partial(_state_kernel, chunk=chunk, num_chunks=num_chunks),
        grid=(batch, kv_heads, splits),
        in_specs=[per_token(dk_part, True), per_token(dv_part, True), per_token(m, False), per_token(m, False),
                  pl.BlockSpec((None, t_pad), lambda b, g, i: (b, 0)),
                  per_head(dk_part, m, split_axis=0), per_head(m, dv_part, split_axis=1)],
        out_specs=[per_head(num_chunks, dk_part, m, split_axis=1), per_head(num_chunks, m, dv_part, split_axis=2),
                   per_head(dk_part, m, split_axis=0), per_head(m, dv_part, split_axis=1)],
        out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, num_chunks, dk, m), jnp.float32),
                   jax.ShapeDtypeStruct((batch, kv_heads, num_chunks, m, dv), jnp.float32),
                   jax.ShapeDtypeStruct((batch, kv_heads, dk, m), jnp.float32),
                   jax.ShapeDtypeStruct((batch, kv_heads, m, dv), jnp.float32)],
        compiler_params=_compiler_params(config.state_warps, config.state_stages),
        interpret=interpret,
        name="nha_slot_state",
    )(ks, vs, gates, writes, run, hk0, hv0)


def _outputs(q, qr, kr, v, ks, vs, gates, writes, hk, hv, seg, run, *,
             window, num_slots, scale, chunk, config, interpret):
    """Launches _output_kernel over (B, H, T/C): o [B, Tp, H, dv] in q.dtype."""
    batch, t_pad, heads, dk = q.shape
    kv_heads, dv, m = ks.shape[2], vs.shape[3], gates.shape[3]
    group = heads // kv_heads

    def query_chunk(width):
        return pl.BlockSpec((None, chunk, None, width), lambda b, h, c: (b, c, h, 0))

    def kv_chunk(width):
        return pl.BlockSpec((None, chunk, None, width), lambda b, h, c: (b, c, h // group, 0))

    def kv_all(width):
        return pl.BlockSpec((None, t_pad, None, width), lambda b, h, c: (b, 0, h // group, 0))

    def chunk_state(*shape):
        return pl.BlockSpec((None, None, None, *shape), lambda b, h, c: (b, h // group, c, 0, 0))

    runs = pl.BlockSpec((None, t_pad), lambda b, h, c: (b, 0))
    return pl.pallas_call(
        functools.partial(_output_kernel, chunk=chunk, sub=min(config.sub_block, chunk),
                          key_block=min(config.key_block, chunk), window=window, num_slots=num_slots, scale=scale),
        grid=(batch, heads, t_pad // chunk),
        in_specs=[query_chunk(dk), query_chunk(dk), kv_chunk(dk), kv_chunk(dv), kv_chunk(m), kv_chunk(m),
                  chunk_state(dk, m), chunk_state(m, dv), kv_all(dk), kv_all(dv), runs, runs],
        out_specs=query_chunk(dv),
        out_shape=jax.ShapeDtypeStruct((batch, t_pad, heads, dv), q.dtype),
        compiler_params=_compiler_params(config.output_warps, config.output_stages),
        interpret=interpret,
        name="nha_output",
    )(q, qr, ks, vs, gates, writes, hk, hv, kr, v, seg, run)


def _core_pallas(q, qr, kr, v, ks, vs, gates, writes, hk0, hv0, seg, run, *,
                 window, num_slots, scale, chunk, interpret, config=None):
    """Forward of the core problem with the Pallas kernels. Shapes as `_core_xla`; returns (o, hk_final, hv_final).

    config: a tuning.TritonConfig (its chunk is ignored: `chunk` is fixed by the prepared gates); None = the table.
    """
    if config is None:
        config = triton_config(max(q.shape[3], vs.shape[3]), state_programs=ks.shape[0] * ks.shape[2])
    hk, hv, hk_final, hv_final = _slot_states(ks, vs, gates, writes, hk0, hv0, run, chunk=chunk, config=config,
                                              interpret=interpret)
    out = _outputs(q, qr, kr, v, ks, vs, gates, writes, hk, hv, seg, run, window=window, num_slots=num_slots,
                   scale=scale, chunk=chunk, config=config, interpret=interpret)
    return out, hk_final, hv_final


def _core_xla(q, qr, kr, v, ks, vs, gates, writes, hk0, hv0, seg, run, *, window, num_slots, scale, chunk):
    """The same chunked algorithm in XLA (what the backward pass differentiates).

    q, qr [B, Tp, H, dk]; kr, ks [B, Tp, Hkv, dk]; v, vs [B, Tp, Hkv, dv]; gates, writes [B, Tp, Hkv, m] float32;
    hk0 [B, Hkv, dk, m], hv0 [B, Hkv, m, dv] float32; seg, run [B, Tp] int32. Tp is a multiple of `chunk`.
    Returns o [B, Tp, H, dv] (q.dtype), hk_final [B, Hkv, dk, m], hv_final [B, Hkv, m, dv] (float32).
    """
    batch, t_pad, heads, dk = q.shape
    kv_heads, dv, m = ks.shape[2], vs.shape[3], gates.shape[3]
    group = heads // kv_heads
    num_chunks = t_pad // chunk
    f32 = jnp.float32
    lookback = min(max(window - 1, 0), t_pad)
    pad_front = lambda x: jnp.pad(x, [(0, 0), (lookback, 0)] + [(0, 0)] * (x.ndim - 2))
    kr_ext, v_ext = pad_front(kr.astype(f32)), pad_front(v.astype(f32))
    seg_ext = jnp.pad(seg, [(0, 0), (lookback, 0)], constant_values=-2)
    slot_valid = jnp.arange(m) < num_slots
    rows = jnp.arange(chunk)

    def split(x):  # [B, Tp, ...] -> [nC, B, C, ...]
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 1, 0)

    def grouped(x):  # [B, C, H, d] -> [B, C, Hkv, G, d]
        return x.reshape(*x.shape[:2], kv_heads, group, x.shape[-1])

    @jax.checkpoint
    def step(carry, xs):
        hk, hv, state_run = carry
        c, qc, qrc, ksc, vsc, gc, wc, runc = xs
        qc, qrc = grouped(qc.astype(f32)), grouped(qrc.astype(f32))
        ksc, vsc = ksc.astype(f32), vsc.astype(f32)
        same_run = runc[:, :, None] == runc[:, None, :]  # [B, t, p]
        causal = (rows[:, None] >= rows[None, :])[None] & same_run
        diff = gc[:, :, None] - gc[:, None, :]  # [B, t, p, Hkv, m]
        intra = jnp.where(causal[..., None, None], jnp.exp(jnp.where(causal[..., None, None], diff, 0.0)), 0.0)
        intra = intra * wc[:, None]
        inter = jnp.where((runc == state_run[:, None])[..., None, None], jnp.exp(gc), 0.0)  # [B, C, Hkv, m]
        logits = jnp.einsum("btkgd,bkdm->btkgm", qc, hk) * inter[:, :, :, None]
        qk = jnp.einsum("btkgd,bpkd->btpkg", qc, ksc)
        logits += jnp.einsum("btpkg,btpkm->btkgm", qk, intra)
        logits = jnp.where(slot_valid, logits * scale, _MASK_VALUE)
        # Window: keys [c0 - lookback, c0 + C) of the front-padded arrays.
        start = c * chunk
        kw = jax.lax.dynamic_slice_in_dim(kr_ext, start, lookback + chunk, axis=1)
        vw = jax.lax.dynamic_slice_in_dim(v_ext, start, lookback + chunk, axis=1)
        segw = jax.lax.dynamic_slice_in_dim(seg_ext, start, lookback + chunk, axis=1)
        segq = jax.lax.dynamic_slice_in_dim(seg, start, chunk, axis=1)
        offset = rows[:, None] + lookback - jnp.arange(lookback + chunk)[None, :]  # t - j
        visible = (offset >= 0) & (offset < window)
        visible = visible[None] & (segq[:, :, None] == segw[:, None, :])  # [B, t, j]
        scores = jnp.einsum("btkgd,bjkd->btkgj", qrc, kw) * scale
        scores = jnp.where(visible[:, :, None, None], scores, _MASK_VALUE)
        # One softmax over both parts without concatenating them: a concatenate here was the likely source of a
        # minutes-long XLA GPU compile of the backward (input_concatenate_fusion); not re-measured since.
        row_max = jax.lax.stop_gradient(jnp.maximum(jnp.max(logits, axis=-1), jnp.max(scores, axis=-1)))[..., None]
        p_slot = jnp.where(slot_valid, jnp.exp(logits - row_max), 0.0)
        p_win = jnp.where(visible[:, :, None, None], jnp.exp(scores - row_max), 0.0)
        total = jnp.sum(p_slot, axis=-1, keepdims=True) + jnp.sum(p_win, axis=-1, keepdims=True)
        p_slot, p_win = p_slot / total, p_win / total
        out = jnp.einsum("btkgm,bkmv->btkgv", p_slot * inter[:, :, :, None], hv)
        out += jnp.einsum("btkgm,btpkm,bpkv->btkgv", p_slot, intra, vsc)
        out += jnp.einsum("btkgj,bjkv->btkgv", p_win, vw)
        # State leaving the chunk.
        last_run = runc[:, -1]
        gate_last = gc[:, -1]  # [B, Hkv, m]
        weights = wc * jnp.exp(gate_last[:, None] - gc) * (runc == last_run[:, None])[..., None, None]
        decay = jnp.where((state_run == last_run)[:, None, None], jnp.exp(gate_last), 0.0)
        hk = hk * decay[:, :, None, :] + jnp.einsum("bpkd,bpkm->bkdm", ksc, weights)
        hv = hv * decay[..., None] + jnp.einsum("bpkm,bpkv->bkmv", weights, vsc)
        return (hk, hv, last_run), out.reshape(batch, chunk, heads, dv).astype(q.dtype)

    xs = (jnp.arange(num_chunks), split(q), split(qr), split(ks), split(vs), split(gates), split(writes), split(run))
    init = (hk0, hv0, jnp.zeros((batch,), jnp.int32))
    (hk, hv, _), outs = jax.lax.scan(step, init, xs)
    return jnp.moveaxis(outs, 0, 1).reshape(batch, t_pad, heads, dv), hk, hv


@functools.partial(jax.custom_vjp, nondiff_argnums=(12, 13, 14, 15, 16))
def _core(q, qr, kr, v, ks, vs, gates, writes, hk0, hv0, seg, run, window, num_slots, scale, chunk, interpret):
    return _core_pallas(q, qr, kr, v, ks, vs, gates, writes, hk0, hv0, seg, run,
                        window=window, num_slots=num_slots, scale=scale, chunk=chunk, interpret=interpret)


def _core_fwd(q, qr, kr, v, ks, vs, gates, writes, hk0, hv0, seg, run, window, num_slots, scale, chunk, interpret):
    outputs = _core_pallas(q, qr, kr, v, ks, vs, gates, writes, hk0, hv0, seg, run,
                           window=window, num_slots=num_slots, scale=scale, chunk=chunk, interpret=interpret)
    return outputs, (q, qr, kr, v, ks, vs, gates, writes, hk0, hv0, seg, run)


def _core_bwd(window, num_slots, scale, chunk, interpret, residuals, cotangents):
    del interpret
    float_inputs, (seg, run) = residuals[:10], residuals[10:]
    xla = functools.partial(_core_xla, seg=seg, run=run, window=window, num_slots=num_slots, scale=scale,
                            chunk=chunk)
    _, vjp = jax.vjp(lambda *xs: xla(*xs), *float_inputs)
    return (*vjp(cotangents), None, None)


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Preparation (XLA, differentiated by XLA) and the public entry point.


def _pad_axis(x, axis, size, mode="constant"):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, mode=mode)


def _validate(q, k, v, log_alpha, segment_ids, positions, slot_k0, slot_v0, window, rope_theta):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or log_alpha.ndim != 4:
        raise ValueError("q, k, v, log_alpha must be 4-D [B, T, heads, dim]; got "
                         f"{q.shape}, {k.shape}, {v.shape}, {log_alpha.shape}")
    batch, seq, heads, dk = q.shape
    kv_heads = k.shape[2]
    if k.shape != (batch, seq, kv_heads, dk):
        raise ValueError(f"k must be [B, T, Hkv, dk] = [{batch}, {seq}, Hkv, {dk}], got {k.shape}")
    if v.shape[:3] != (batch, seq, kv_heads):
        raise ValueError(f"v must be [B, T, Hkv, dv] matching k {k.shape}, got {v.shape}")
    if log_alpha.shape[:3] != (batch, seq, kv_heads):
        raise ValueError(f"log_alpha must be [B, T, Hkv, m] matching k {k.shape}, got {log_alpha.shape}")
    if heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if window < 0 or window + log_alpha.shape[3] < 1:
        raise ValueError(f"window must be >= 0 and window + m >= 1, got window={window}, m={log_alpha.shape[3]}")
    for name, ids in (("segment_ids", segment_ids), ("positions", positions)):
        if ids is not None and ids.shape != (batch, seq):
            raise ValueError(f"{name} must be [B, T] = [{batch}, {seq}], got {ids.shape}")
    m, dv = log_alpha.shape[3], v.shape[3]
    if slot_k0 is not None and slot_k0.shape != (batch, kv_heads, m, dk):
        raise ValueError(f"slot_k0 must be [B, Hkv, m, dk] = {(batch, kv_heads, m, dk)}, got {slot_k0.shape}")
    if slot_v0 is not None and slot_v0.shape != (batch, kv_heads, m, dv):
        raise ValueError(f"slot_v0 must be [B, Hkv, m, dv] = {(batch, kv_heads, m, dv)}, got {slot_v0.shape}")
    if rope_theta is not None and dk % 2:
        raise ValueError(f"RoPE needs an even dk, got dk={dk}; pass rope_theta=None to turn it off")


def _prepare(q, k, v, log_alpha, segment_ids, positions, slot_k0, slot_v0, *, window, rope_theta, block_size):
    """XLA preparation of the core problem (see the module docstring). Returns (core_args, chunk)."""
    batch, seq, heads, dk = q.shape
    kv_heads, dv, m = k.shape[2], v.shape[3], log_alpha.shape[3]
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, seq), jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    dk_pad, dv_pad, m_pad = _pow2_at_least(dk), _pow2_at_least(dv), _pow2_at_least(m)
    chunk = triton_config(max(dk_pad, dv_pad)).chunk if block_size is None else int(block_size)
    if chunk < _MIN_DIM or chunk & (chunk - 1):
        raise ValueError(f"block_size must be a power of two >= {_MIN_DIM} (or None), got {block_size}")
    t_pad = -(-seq // chunk) * chunk
    dtype = q.dtype
    k, v = k.astype(dtype), v.astype(dtype)

    # Window copies (RoPE'd) and the padded sequence: pad tokens join the last run and write nothing.
    seg = _pad_axis(segment_ids.astype(jnp.int32), 1, t_pad, mode="edge")
    pos = _pad_axis(positions.astype(jnp.int32), 1, t_pad, mode="edge")
    q_p, k_p, v_p = (_pad_axis(x, 1, t_pad) for x in (q, k, v))
    qr, kr = (q_p, k_p) if rope_theta is None else (rope(q_p, pos, rope_theta).astype(q_p.dtype),
                                                            rope(k_p, pos, rope_theta).astype(k_p.dtype))
    # Slot inputs shifted by W: position p carries token p - W, written only inside one real run.
    t_idx = jnp.arange(t_pad)
    seg_src = jnp.pad(seg, [(0, 0), (window, 0)], constant_values=-1)[:, :t_pad]
    writes_ok = (t_idx >= window) & (t_idx < seq) & (seg_src == seg) & (seg_src >= 0)  # [B, Tp]

    def shift(x):
        return jnp.pad(x, [(0, 0), (window, 0), (0, 0), (0, 0)])[:, :t_pad]

    la_src = shift(_pad_axis(log_alpha.astype(jnp.float32), 1, t_pad))
    shifted_gates = jnp.where(writes_ok[:, :, None, None], la_src, 0.0)
    writes = jnp.where(writes_ok[:, :, None, None], -jnp.expm1(la_src), 0.0)
    gates = jnp.cumsum(shifted_gates.reshape(batch, t_pad // chunk, chunk, kv_heads, m), axis=2)
    gates = gates.reshape(batch, t_pad, kv_heads, m)
    ks, vs = shift(k_p), shift(v_p)
    run = jnp.maximum(seg, 0)  # dummy tokens (-1) are transparent to the slots: run 0's state passes through

    hk0 = jnp.zeros((batch, kv_heads, dk, m), jnp.float32) if slot_k0 is None else jnp.swapaxes(slot_k0, 2, 3)
    hv0 = jnp.zeros((batch, kv_heads, m, dv), jnp.float32) if slot_v0 is None else slot_v0
    pad_dim = lambda x, size: _pad_axis(x, x.ndim - 1, size)
    q_p, qr, kr, ks = (pad_dim(x, dk_pad) for x in (q_p, qr, kr, ks))
    v_p, vs = pad_dim(v_p, dv_pad), pad_dim(vs, dv_pad)
    gates, writes = pad_dim(gates, m_pad), pad_dim(writes, m_pad)
    hk0 = pad_dim(_pad_axis(hk0.astype(jnp.float32), 2, dk_pad), m_pad)
    hv0 = pad_dim(_pad_axis(hv0.astype(jnp.float32), 2, m_pad), dv_pad)

    core_args = (q_p, qr, kr, v_p, ks, vs, gates, writes, hk0, hv0, seg, run)
    return core_args, chunk


def nha_attention_triton(q, k, v, log_alpha, segment_ids, positions, slot_k0=None, slot_v0=None, *,
                         window, scale, rope_theta, return_slots=False, interpret=False, block_size=None):
    """Native Hybrid Attention with the Pallas (Triton lowering) kernels; differentiable (custom_vjp).

    q [B, T, H, dk], k [B, T, Hkv, dk], v [B, T, Hkv, dv] (bf16 or float32); log_alpha [B, T, Hkv, m] float32 (<= 0);
    segment_ids [B, T] int32 non-decreasing run ids (-1 = dummy tokens before run 0), positions [B, T] int32 RoPE
    positions; slot_k0 [B, Hkv, m, dk], slot_v0 [B, Hkv, m, dv] float32 or None (zeros), seen by run 0 only.
    window >= 0 tokens (counting the current one); scale multiplies every logit; rope_theta None turns RoPE off.
    Returns out [B, T, H, dv] in q.dtype, and with return_slots also slot_k [B, Hkv, m, dk] and slot_v
    [B, Hkv, m, dv] (float32), the slot state after token T-1.
    interpret=True runs the kernels in Pallas interpret mode (CPU). block_size (a power of two >= 16) overrides the
    tuning table's chunk (tests use small chunks to cover many chunk boundaries cheaply).
    """
    window = int(window)
    _validate(q, k, v, log_alpha, segment_ids, positions, slot_k0, slot_v0, window, rope_theta)
    seq, dv, m, dk = q.shape[1], v.shape[3], log_alpha.shape[3], q.shape[3]
    core_args, chunk = _prepare(q, k, v, log_alpha, segment_ids, positions, slot_k0, slot_v0, window=window,
                                rope_theta=rope_theta, block_size=block_size)
    out, hk, hv = _core(*core_args, window, m, float(scale), chunk, bool(interpret))
    out = out[:, :seq, :, :dv]
    if not return_slots:
        return out
    return out, jnp.swapaxes(hk, 2, 3)[:, :, :m, :dk], hv[:, :, :m, :dv]
