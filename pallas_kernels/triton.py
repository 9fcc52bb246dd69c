"""NHA attention on GPU: Pallas kernels with the Triton lowering, their launcher and the custom_vjp.

Layout of the computation (NHA_SPEC sections 1 and 3):
- XLA prepares the inputs once: pads T to a multiple of the chunk and the head/slot dims to powers of two, applies
  RoPE to the window copies of q and k, shifts the slot inputs by W (k'_p = k_{p-W}: token j is written at step
  j + W) and zeroes the log gates (and so the writes) that would cross a change of run id. Everything here is
  differentiated by XLA, so the kernels only see the "core" problem below. Each kernel turns the log gates of the
  block it works on into that block's cumulative gates and write strengths (`_local_gates`), and the backward
  kernels give the log gates' gradient (`_log_gate_grad`).
- `_state_kernel`, grid (B, Hkv, dk/dv slices), sequential over chunks: the slot states H^k_c [dk, m] and
  H^v_c [m, dv] that enter each chunk (in HBM, in the inputs' dtype: TritonConfig.input_dtype_states), and the
  final state.
- `_output_kernel`, grid (B, H / S, T/C), fully parallel: a program owns S query heads of one GQA group (the kv
  head's keys, states and gates loaded once, the heads' rows stacked into [S * R, d] tiles: TritonConfig.stacked_rows)
  and walks its chunk in sub-blocks of R rows carrying the slot state; per sub-block: slot logits (state + the
  pairs inside the sub-block), window logits over key blocks with an online softmax, one float32 softmax over both,
  slot read, window read. The pair terms are small dots with the decay factored through the sub-block's start
  (`_FactoredPairs`). Where a chunk's gates are so strong that a factor could overflow (`_strong_chunks`), a second
  pass of the kernel redoes that chunk in place with an elementwise [R, R, m] block whose gate exponents are all
  <= 0 (`_launch_output_kernel`); both output kernels run this way.
- The backward (custom_vjp) keeps o, the row log-sum-exp and the states entering each chunk, and recomputes the
  rest: `_output_backward_kernel`, grid (B, H / S, T/C) like the output kernel, recomputes the joint softmax from
  the saved lse and gives dq, the window dq, the pair-block gradients of the shifted keys/values, write strengths
  and gates (summed over its S heads, which it may take in passes of fewer heads: TritonConfig.backward_head_passes),
  and the per-row factors of the state gradient; `_state_grad_kernel`, grid (B, H or Hkv, dk/dv slices), runs the
  sub-blocks last to first carrying only dH^k/dH^v and stores the gradient of the state leaving each chunk;
  `_state_backward_kernel`, grid (B, H or Hkv, chunks), parallel, gives the gradients through the state hand-over
  from it; `_window_backward_kernel`, grid (B, H / S, key blocks), gives the window
  dk/dv without atomics. XLA sums what is left of each GQA group. With TritonConfig.separate_window_dq the window
  dq comes from `_window_dq_kernel`, a pass of its own.
- When batch x kv heads x one chunk's state is small (TritonConfig.scan_states), the two sequential state kernels
  give way to `_scanned_chunk_states` (per-chunk contributions from `_chunk_contribution_kernel`, or as batched
  matmuls in XLA without TritonConfig.scan_contribution_kernel; then `_chunk_scan`, an elementwise scan kernel over
  chunks with its own reverse kernel) and `_core_given_states`, whose output backward gives the
  gradient of each chunk's entering state directly (q^T a and p^T do over the chunk's rows).
- A program that owns one query head reads and writes plain [rows, d] blocks (`_head_block`), without the head
  axis that stacked heads need.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import name_residuals
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


def _window_compiler_params(config):
    """Compiler params of the window dk/dv and window dq kernels."""
    stages = config.backward_stages if config.window_stages is None else config.window_stages
    return _compiler_params(config.window_warps, stages)


def _dot(a, b, *, trans_a=False, trans_b=False, exact=True):
    """Matrix product with float32 accumulation. Float32 operands are multiplied exactly (IEEE, on the CUDA cores)
    when `exact`, else as tf32 on the tensor cores (10-bit mantissas: for kernels whose inputs are bf16 anyway)."""
    a, b = (a.T if trans_a else a), (b.T if trans_b else b)
    precision = None
    if a.dtype == jnp.float32 or b.dtype == jnp.float32:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        precision = jax.lax.Precision.HIGHEST if exact else jax.lax.Precision.DEFAULT
    # plgpu.dot exists in jax 0.10; pl.dot is gone from jax 0.11, where jnp.dot lowers directly.
    if hasattr(plgpu, "dot"):
        return plgpu.dot(a, b, precision=precision).astype(jnp.float32)
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Kernels.

# The largest gate span of a sub-block (max over slots of -G_last, the summed -log alpha of its rows, with the gates
# G of `_local_gates`) for which its pairs are computed as matmuls with the decay factored through the sub-block's
# start: exp(G_t - G_p) = exp(G_t) * exp(-G_p), the second factor up to e^span (float32 overflows near e^88; the
# margin covers the sums of products). Stronger forgetting falls back to the elementwise [R, R, m] block.
_FACTORED_SPAN = 60.0


def _per_row(x, heads):
    """Per-token values [R, ...] -> the stacked rows [R * heads, ...] of a program's query heads.

    An output kernel's program owns `heads` query heads of one GQA group and stacks their rows token-major (row
    t * heads + g is token t of head g), so that its dots are [R * heads, d] tiles over the kv head's shared keys,
    states and gates."""
    if heads == 1:
        return x
    stacked = jnp.broadcast_to(x[:, None], (x.shape[0], heads) + x.shape[1:])
    return stacked.reshape((x.shape[0] * heads,) + x.shape[1:])


def _stacked(x):
    """A block [R, heads, d] of query-head rows -> [R * heads, d] (the layout of `_per_row`)."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _head_block(heads):
    """The head axis of a BlockSpec over a program's query heads: squeezed (None) for one head per program, whose
    kernels then read and write plain [R, ...] rows: Triton's reshapes between [R, 1, d] and [R, d] cost layout
    conversions (H100, dk = 128, one head per program: output backward 3.94 ms with them, against 2.35)."""
    return None if heads == 1 else heads


def _heads_of(ref):
    """Query heads per program of a kernel from a [rows, heads, d] ref (a squeezed head axis: 1)."""
    return ref.shape[1] if ref.ndim == 3 else 1


def _head_rows(ref, rows, heads, part, parts):
    """The index of rows `rows` of part `part` of `parts` equal groups of a program's S = heads query heads in a
    ref [R, S, ...] ([R, ...] for one head), and how many heads it takes."""
    if heads == 1:
        return (rows,) + (slice(None),) * (ref.ndim - 1), 1
    per_part = heads // parts
    head = slice(None) if parts == 1 else part if per_part == 1 else pl.ds(part * per_part, per_part)
    return (rows, head) + (slice(None),) * (ref.ndim - 2), per_part


def _load_rows(ref, rows, heads, part=0, parts=1):
    """Rows `rows` of a program's query heads (of part `part` of `parts` equal groups of them), stacked token-major
    (`_per_row`): [R, S, ...] -> [R * S / parts, ...]."""
    index, per_part = _head_rows(ref, rows, heads, part, parts)
    x = ref[index]
    return x if per_part == 1 else _stacked(x)


def _store_rows(ref, rows, x, heads, part=0, parts=1):
    """Writes stacked rows x [R * S / parts, ...] to rows `rows` of a program's query heads (of part `part` of
    `parts`): the inverse of _load_rows."""
    index, per_part = _head_rows(ref, rows, heads, part, parts)
    if per_part > 1:
        x = x.reshape((x.shape[0] // per_part, per_part) + x.shape[1:])
    ref[index] = x.astype(ref.dtype)


def _sum_heads(x, heads):
    """Stacked rows [R * heads, n] -> [R, n] summed over the heads (a kv head's share of its query heads)."""
    if heads == 1:
        return x
    return jnp.sum(x.reshape(x.shape[0] // heads, heads, x.shape[1]), axis=1)


def _local_gates(log_gates):
    """A block's gates from its rows' log gates [R, m] float32 (shifted by W; 0 where nothing is written): the gates
    G_t = sum of the log gates of the block's rows up to t (<= 0: the decay from the block's start to after row
    t), and the write strengths s_t = 1 - alpha_t = -expm1(log alpha_t). Every kernel computes them for the block
    it works on: each decay it needs is a difference of gates of one block, so no gate is carried across blocks."""
    return jnp.cumsum(log_gates, axis=0), -jnp.expm1(log_gates)


def _log_gate_grad(dgates, dwrites, writes):
    """The gradient of a block's log gates [R, m] from those of its gates and write strengths (`_local_gates`):
    log alpha_t reaches every G_t' with t' >= t (a reverse cumulative sum: the total less a forward one, as Pallas'
    Triton lowering has only forward cumsums; as an exact float32 dot with a triangular matrix of ones it cost the
    output backward 10% on an H100), and ds/dlog alpha = s - 1. dgates, dwrites, writes [R, m] float32."""
    return jnp.sum(dgates, axis=0)[None, :] - jnp.cumsum(dgates, axis=0) + dgates + dwrites * (writes - 1.0)


class _FactoredPairs:
    """The pair weights PW[t, p, i] = visible[t, p] s_p[i] exp(G_t[i] - G_p[i]) of one sub-block as
    visible[t, p] * to_query[t, i] * from_key[p, i] * s_p[i], so that every sum against them is a small float32 dot.

    gates, writes [R, m] (`_local_gates`); visible [R, R] bool (p <= t, same run); heads: query heads stacked on the
    rows (`_per_row`): queries come as [R * heads, ...], keys as [R, ...].
    to_query = exp(G_t) <= 1; from_key = exp(-G_p) in [1, e^span]. exact: IEEE float32 dots
    (float32 inputs), else tf32 (bf16 inputs: the IEEE dots on the CUDA cores were most of the kernels' instructions).
    Valid while e^span stays finite (span <= _FACTORED_SPAN): `_strong_chunks` sends the other chunks to
    `_ElementwisePairs`.
    """

    def __init__(self, gates, writes, visible, exact, heads):
        self.exact = exact
        self.visible = _per_row(visible.astype(jnp.float32), heads)
        self.to_query = _per_row(jnp.exp(gates), heads)
        self.from_key = jnp.exp(-gates)
        self.key_weights = writes * self.from_key

    def over_keys(self, x):
        """sum_p x[t, p] PW[t, p, :]: x [R * heads, R] -> [R * heads, m]."""
        return self.to_query * _dot(x * self.visible, self.key_weights, exact=self.exact)

    def over_slots(self, y):
        """sum_i y[t, i] PW[t, :, i]: y [R * heads, m] -> [R * heads, R]."""
        return self.visible * _dot(y * self.to_query, self.key_weights, trans_b=True, exact=self.exact)

    def write_grad(self, x, y):
        """sum over t and heads of x[t, p] y[t, i] exp(G_t[i] - G_p[i]) visible[t, p] -> [R, m] (the gradient of
        s_p): x [R * heads, R], y [R * heads, m]."""
        return self.from_key * _dot(x * self.visible, y * self.to_query, trans_a=True, exact=self.exact)


class _ElementwisePairs:
    """The same pair weights as an explicit [R, R, m] block: exact for any gates (every exponent <= 0). With stacked
    heads, one head's rows at a time (the block is already at the register limit)."""

    def __init__(self, gates, writes, visible, exact, heads):
        del exact
        self.heads = heads
        self.decay = jnp.where(visible[:, :, None],
                               jnp.exp(jnp.minimum(gates[:, None, :] - gates[None, :, :], 0.0)), 0.0)
        self.weights = self.decay * writes[None, :, :]

    def _head(self, x, g):
        """Rows of head g of stacked rows x [R * heads, n] -> [R, n]."""
        if self.heads == 1:
            return x
        rows = x.reshape(x.shape[0] // self.heads, self.heads, x.shape[1])
        return jnp.sum(jnp.where(jnp.arange(self.heads)[None, :, None] == g, rows, 0.0), axis=1)

    def _per_head(self, fn, x):
        """fn applied to each head's rows of x, restacked to [R * heads, n]."""
        if self.heads == 1:
            return fn(x)
        heads = jnp.arange(self.heads)[None, :, None]
        out = None
        for g in range(self.heads):
            part = jnp.where(heads == g, fn(self._head(x, g))[:, None, :], 0.0)
            out = part if out is None else out + part
        return _stacked(out)

    def over_keys(self, x):
        return self._per_head(lambda x: jnp.sum(x[:, :, None] * self.weights, axis=1), x)

    def over_slots(self, y):
        return self._per_head(lambda y: jnp.sum(y[:, None, :] * self.weights, axis=2), y)

    def write_grad(self, x, y):
        total = None
        for g in range(self.heads):
            xg, yg = self._head(x, g), self._head(y, g)
            part = jnp.sum(self.decay * xg[:, :, None] * yg[:, None, :], axis=0)
            total = part if total is None else total + part
        return total


def _pair_kernel(body, pairs, num_inputs, num_previous):
    """An output kernel (`_output_kernel`, `_output_backward_kernel`) with its pair terms in one form, as
    `_launch_output_kernel` runs it. Refs: strong [1] (`_strong_chunks` of the program's chunk and kv head), the
    body's inputs, `num_previous` refs aliased to the outputs (the first pass's results, left as they are where this
    pass writes nothing), the body's outputs.

    pairs: "factored" (`_FactoredPairs` everywhere: the results of strong chunks overflow and are overwritten by the
    fallback pass), "fallback" (`_ElementwisePairs`, only in programs whose chunk is strong) or "elementwise"
    (`_ElementwisePairs` everywhere). One form per kernel, with no branch between forms inside it: with a lax.cond
    per pair term the elementwise [R, R, m] branch took registers from the factored one (H100, dk = 128, 32-row
    sub-blocks: output backward 1.53 ms with the conds, 0.81 without).
    """
    def kernel(strong_ref, *refs):
        refs = refs[:num_inputs] + refs[num_inputs + num_previous:]
        # The program id is read outside the cond: interpret mode has none inside one.
        run = functools.partial(body, *refs, chunk_index=pl.program_id(2))
        if pairs == "fallback":
            pl.when(strong_ref[0] != 0)(functools.partial(run, pair_cls=_ElementwisePairs))
        else:
            run(pair_cls=_FactoredPairs if pairs == "factored" else _ElementwisePairs)
    return kernel


def _block_sums(log_gates, rows):
    """log_gates [B, Tp, Hkv, m] summed over each block of `rows` tokens: [B, Tp / rows, Hkv, m], each block's
    G_last (`_local_gates`), its decay's exponent."""
    batch, t_pad, kv_heads, m = log_gates.shape
    return jnp.sum(log_gates.reshape(batch, t_pad // rows, rows, kv_heads, m), axis=2)


def _strong_chunks(log_gates, chunk, sub):
    """int32 [B, Tp / chunk, Hkv]: 1 where a sub-block of `sub` rows of the chunk forgets too fast for the factored
    pair form (its span, max over slots of -G_last, > _FACTORED_SPAN), else 0. log_gates [B, Tp, Hkv, m]."""
    batch, t_pad, kv_heads, _ = log_gates.shape
    spans = jnp.max(-_block_sums(log_gates, sub), axis=-1).reshape(batch, t_pad // chunk, chunk // sub, kv_heads)
    return (jnp.max(spans, axis=2) > _FACTORED_SPAN).astype(jnp.int32)


def _handover(gates, gate_last, runs, state_run, last_run):
    """How a block of R rows hands the slot state on: new = decay * old + (writes * to_last)^T @ (ks | vs).

    gates [R, m] the rows' gates (`_local_gates`), gate_last [m] the last row's (the block's summed log gates),
    runs [R] their slot run ids, state_run the run of the state entering the block, last_run the last row's run.
    Returns to_last [R, m] = exp(G_last - G_p) on the last row's run (tokens of an earlier run never reach the
    state that leaves the block), 0 elsewhere, and decay [m] = exp(G_last) if the entering state's run reaches the
    block's end (runs are contiguous), else 0. Every exponent is <= 0.
    """
    to_last = jnp.where((runs == last_run)[:, None], jnp.exp(gate_last[None, :] - gates), 0.0)
    decay = jnp.where(state_run == last_run, jnp.exp(gate_last), 0.0)
    return to_last, decay


class _EnteringState:
    """The slot state entering each sub-block of an output kernel's chunk, handed out as dot operands.

    hk_ref [dk, m], hv_ref [m, dv] hold the state entering the chunk. With one sub-block per chunk the state is read
    from them at each use (in the inputs' dtype), so that it is not held in registers across the kernel (the output
    kernels run at the register limit); with several sub-blocks it is carried in float32 and advanced over each.
    """

    def __init__(self, hk_ref, hv_ref, dtype, carried):
        self.hk_ref, self.hv_ref, self.dtype, self.carried = hk_ref, hv_ref, dtype, carried
        if carried:
            self.hk, self.hv = hk_ref[...].astype(jnp.float32), hv_ref[...].astype(jnp.float32)

    def keys(self):
        """H^k [dk, m] in the inputs' dtype."""
        return (self.hk if self.carried else self.hk_ref[...]).astype(self.dtype)

    def values(self):
        """H^v [m, dv] in the inputs' dtype."""
        return (self.hv if self.carried else self.hv_ref[...]).astype(self.dtype)

    def advance(self, decay, weights, ks, vs):
        """H <- decay * H + weights^T @ (ks | vs), over a sub-block: decay [m], weights [R, m] (inputs' dtype)."""
        self.hk = self.hk * decay[None, :] + _dot(ks, weights, trans_a=True)
        self.hv = self.hv * decay[:, None] + _dot(weights, vs, trans_a=True)


def _state_kernel(ks_ref, vs_ref, log_gates_ref, run_ref, hk0_ref, hv0_ref,
                  hk_ref, hv_ref, hk_final_ref, hv_final_ref, *, chunk, num_chunks):
    """One (batch, kv head, slice of dk and dv): H^k/H^v entering every chunk, and after the last one.

    ks [Tp, dk], vs [Tp, dv] shifted keys/values; log_gates [Tp, m] shifted log gates (0 where nothing is written:
    `_local_gates`); run [Tp] slot run ids (non-decreasing);
    hk0 [dk, m], hv0 [m, dv] initial state (belongs to run 0). Outputs hk [nC, dk, m], hv [nC, m, dv], finals
    (dk and dv here are this program's slices).
    """
    compute_dtype = ks_ref.dtype

    def body(c, carry):
        hk, hv, state_run = carry
        hk_ref[c, :, :] = hk.astype(hk_ref.dtype)
        hv_ref[c, :, :] = hv.astype(hv_ref.dtype)
        rows = pl.ds(c * chunk, chunk)
        last_run = run_ref[c * chunk + chunk - 1]
        log_gates = log_gates_ref[rows, :]
        gates, writes = _local_gates(log_gates)
        # The chunk's summed log gates from its tile here: loaded as a precomputed row instead, this kernel took
        # 0.721 against 0.633 ms (H100, B = 2, T = 8192, dk = 128).
        to_last, decay = _handover(gates, jnp.sum(log_gates, axis=0), run_ref[rows], state_run, last_run)
        weights = (writes * to_last).astype(compute_dtype)
        hk = hk * decay[None, :] + _dot(ks_ref[rows, :], weights, trans_a=True)
        hv = hv * decay[:, None] + _dot(weights, vs_ref[rows, :], trans_a=True)
        return hk, hv, last_run

    init = (hk0_ref[...], hv0_ref[...], jnp.int32(0))
    hk, hv, _ = jax.lax.fori_loop(0, num_chunks, body, init)
    hk_final_ref[...] = hk
    hv_final_ref[...] = hv


def _output_kernel(q_ref, qr_ref, ks_ref, vs_ref, log_gates_ref, hk_ref, hv_ref,
                   kr_ref, v_ref, seg_ref, run_ref, o_ref, lse_ref, *,
                   chunk, sub, key_block, window, num_slots, scale, chunk_index, pair_cls):
    """One (batch, block of query heads of one GQA group, chunk of C queries): the NHA output of those queries.

    q/qr [C, S, dk] the S query heads' queries (plain for slots, RoPE'd for the window); ks [C, dk], vs [C, dv],
    log_gates [C, m] this chunk's shifted slot inputs; hk [dk, m], hv [m, dv] the state entering the
    chunk; kr [Tp, dk], v [Tp, dv] the whole (RoPE'd) keys and values of the kv head; seg [Tp] window run ids,
    run [Tp] slot run ids; chunk_index this program's chunk (its program id 2, given by `_pair_kernel`). Outputs o
    [C, S, dv] and lse [C, S], the float32 log-sum-exp of each row's joint softmax (for the backward). The S heads'
    rows are stacked (`_per_row`): every dot has R * S rows.

    The chunk is walked in sub-blocks of `sub` rows, carrying the slot state from one to the next, so that the
    state entering a sub-block reaches its rows through exp(G_t) <= 1 (the sub-block's `_local_gates`). The pairs
    inside a sub-block are `pair_cls` (`_pair_kernel`): factored dots, or the elementwise block with
    exp(G_t - G_p) <= 1.
    """
    heads = _heads_of(q_ref)
    c = chunk_index
    c0 = c * chunk
    rows = jnp.arange(sub)
    row_token = jnp.arange(sub * heads) // heads  # stacked row -> token of the sub-block
    m_pad = log_gates_ref.shape[-1]
    dv = o_ref.shape[-1]
    slot_valid = (jnp.arange(m_pad) < num_slots)[None, :]
    causal = rows[:, None] >= rows[None, :]
    dtype = q_ref.dtype
    exact = dtype == jnp.float32

    if num_slots > 0:
        state = _EnteringState(hk_ref, hv_ref, dtype, carried=sub < chunk)
        state_run = jnp.where(c > 0, run_ref[jnp.maximum(c0 - 1, 0)], 0)
    for r0 in range(0, chunk, sub):
        blk = pl.ds(r0, sub)
        t0 = c0 + r0
        acc = jnp.zeros((sub * heads, dv), jnp.float32)

        if num_slots > 0:
            q = _load_rows(q_ref, blk, heads)
            run_q = run_ref[pl.ds(t0, sub)]
            log_gates = log_gates_ref[blk, :]
            gates, writes = _local_gates(log_gates)
            # The state entering the sub-block reaches query t only if t's run began before the sub-block.
            inter_gate = _per_row(jnp.where((run_q == state_run)[:, None], jnp.exp(gates), 0.0), heads)
            # Built where used (twice, here and after the window loop): sharing the [R, m] factors across the terms
            # made the output backward 8% slower in v10 (H100), as they stay live in registers.
            pairs = functools.partial(pair_cls, gates, writes, causal & (run_q[:, None] == run_q[None, :]), exact,
                                      heads)
            qk = _dot(q, ks_ref[blk, :], trans_b=True)
            logits = _dot(q, state.keys()) * inter_gate + pairs().over_keys(qk)
            logits = jnp.where(slot_valid, logits * scale, _MASK_VALUE)
            row_max = jnp.max(logits, axis=1)
            row_sum = jnp.sum(jnp.where(slot_valid, jnp.exp(logits - row_max[:, None]), 0.0), axis=1)
        else:
            row_max = jnp.full((sub * heads,), _MASK_VALUE, jnp.float32)
            row_sum = jnp.zeros((sub * heads,), jnp.float32)

        if window > 0:
            qr = _load_rows(qr_ref, blk, heads)
            t_idx = t0 + row_token
            seg_q = _per_row(seg_ref[pl.ds(t0, sub)], heads)
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
            pair_probs = pairs().over_slots(probs)  # [t, p]
            acc += _dot((probs * inter_gate).astype(dtype), state.values())
            acc += _dot(pair_probs.astype(dtype), vs)
        _store_rows(o_ref, blk, acc / row_sum[:, None], heads)
        _store_rows(lse_ref, blk, row_max + jnp.log(row_sum), heads)

        if num_slots > 0 and r0 + sub < chunk:
            # Advance the state over this sub-block (as _state_kernel does over a chunk).
            last_run = run_ref[t0 + sub - 1]
            to_last, decay = _handover(gates, jnp.sum(log_gates, axis=0), run_q, state_run, last_run)
            state.advance(decay, (writes * to_last).astype(dtype), ks_ref[blk, :], vs)
            state_run = last_run


def _output_backward_kernel(q_ref, qr_ref, ks_ref, vs_ref, log_gates_ref, hk_ref, hv_ref, kr_ref, v_ref,
                            seg_ref, run_ref, do_ref, lse_ref, delta_ref,
                            dq_ref, dks_ref, dvs_ref, dlog_gates_ref, state_k_ref, state_v_ref, *dqr_ref,
                            chunk, sub, key_block, window, num_slots, scale, chunk_index, pair_cls,
                            chunk_state_grads, passes):
    """Backward of `_output_kernel` for one (batch, block of S query heads, chunk), all but the slot-state recurrence.

    Inputs as `_output_kernel`, plus do [C, S, dv] the output gradient, lse [C, S] the forward's row log-sum-exp
    and delta [C, S] = sum(do * o) per row. The softmax is recomputed from lse; the chunk is walked in the forward's
    sub-blocks (same state carry, same non-positive gate exponents, same stacked rows). Outputs per query head
    (in the inputs' dtype): dq [C, S, dk] (slot branch), and when the launcher passes a dqr ref [C, S, dk] the
    window branch's (else `_window_dq_kernel` gives it). Summed over the S heads: dks [C, dk], dvs [C, dv] (inputs'
    dtype) and float32 dlog_gates [C, m], the gradient of the rows' log gates (`_log_gate_grad`) through the pairs
    inside each sub-block and the decay of the state entering it. The state's share, by the per-row factors
    a = scale * dlogits * inter and p = probs * inter (dH^k = q^T a, dH^v = p^T do for the state entering each
    sub-block): as a, p [C, S, m] per query head (inputs' dtype), which `_state_backward_kernel` carries back; or,
    with chunk_state_grads (one sub-block per chunk, the scan path), as the chunk's dH^k [dk, m], dH^v [m, dv] summed
    over the S heads (in the chunk states' dtype), so that neither the factors nor the queries go through HBM again.
    The S heads are taken in `passes` passes of S / passes heads each (TritonConfig.backward_head_passes).
    """
    heads = _heads_of(q_ref)
    per_pass = heads // passes
    c = chunk_index
    c0 = c * chunk
    rows = jnp.arange(sub)
    m_pad = log_gates_ref.shape[-1]
    slot_valid = (jnp.arange(m_pad) < num_slots)[None, :]
    causal = rows[:, None] >= rows[None, :]
    dtype = q_ref.dtype
    exact = dtype == jnp.float32

    state = _EnteringState(hk_ref, hv_ref, dtype, carried=sub < chunk)
    state_run = jnp.where(c > 0, run_ref[jnp.maximum(c0 - 1, 0)], 0)
    for r0 in range(0, chunk, sub):
        blk = pl.ds(r0, sub)
        t0 = c0 + r0
        ks, vs = ks_ref[blk, :], vs_ref[blk, :]
        log_gates = log_gates_ref[blk, :]
        gates, writes = _local_gates(log_gates)
        run_q = run_ref[pl.ds(t0, sub)]
        inter_rows = jnp.where((run_q == state_run)[:, None], jnp.exp(gates), 0.0)
        visible = causal & (run_q[:, None] == run_q[None, :])

        def head_pass(part):
            """The gradients of part `part` of the heads: stores their dq (and factors), returns their sums."""
            load = lambda ref: _load_rows(ref, blk, heads, part, passes)
            store = lambda ref, x: _store_rows(ref, blk, x, heads, part, passes)
            q, d_out, lse, delta = load(q_ref), load(do_ref), load(lse_ref), load(delta_ref)

            # Recompute the slot logits and probabilities exactly as the forward did.
            inter = _per_row(inter_rows, per_pass)
            # Pair weights PW[t, p, m] = s_p exp(G_t - G_p) for p <= t in t's run (see _FactoredPairs).
            pairs = functools.partial(pair_cls, gates, writes, visible, exact, per_pass)
            q_hk = _dot(q, state.keys())  # [t, m]
            qk = _dot(q, ks, trans_b=True) * scale  # [t, p]
            do_vs = _dot(d_out, vs, trans_b=True)  # [t, p]
            pw = pairs()
            intra_logits, intra_read = pw.over_keys(qk), pw.over_keys(do_vs)
            probs = jnp.where(slot_valid, jnp.exp(scale * q_hk * inter + intra_logits - lse[:, None]), 0.0)

            # Slot read o += (probs * inter) @ H^v + sum_p (probs . PW) vs_p, then the softmax.
            do_hv = _dot(d_out, state.values(), trans_b=True)  # [t, m]
            d_logits = probs * (do_hv * inter + intra_read - delta[:, None])
            # Gates and write strengths through PW[t, p] = s_p exp(G_t - G_p) and inter[t] = exp(G_t).
            # With g[t, p] = probs[t] do_vs[t, p] + d_logits[t] qk[t, p], the gradient of PW, the sums over p
            # of g * PW are the intra terms above, and the sums over t factor out s_p.
            pw = pairs()
            logit_pairs, read_pairs = pw.over_slots(d_logits), pw.over_slots(probs)
            d_writes = pw.write_grad(do_vs, probs) + pw.write_grad(qk, d_logits)
            store(dq_ref, scale * (_dot((d_logits * inter).astype(dtype), state.keys(), trans_b=True)
                                   + _dot(logit_pairs.astype(dtype), ks)))
            inter_gates = (probs * do_hv + scale * d_logits * q_hk) * inter
            sums = [scale * _dot(logit_pairs.astype(dtype), q, trans_a=True),
                    _dot(read_pairs.astype(dtype), d_out, trans_a=True), d_writes,
                    _sum_heads(probs * intra_read + d_logits * intra_logits + inter_gates, per_pass)]
            if chunk_state_grads:  # sub == chunk: the state entering the sub-block is the chunk's
                sums += [_dot(q, (scale * d_logits * inter).astype(dtype), trans_a=True),
                         _dot((probs * inter).astype(dtype), d_out, trans_a=True)]
            else:
                store(state_k_ref, scale * d_logits * inter)
                store(state_v_ref, probs * inter)
            if dqr_ref:
                store(dqr_ref[0], _window_query_grad(load(qr_ref), d_out, lse, delta, t0, sub, per_pass, seg_ref,
                                                     kr_ref, v_ref, key_block=key_block, window=window, scale=scale))
            return sums

        # Each pass's live tiles are those of its own heads; the kv head's gradients add up across passes.
        sums = head_pass(0)
        for part in range(1, passes):
            sums = [total + x for total, x in zip(sums, head_pass(part))]
        dks, dvs, d_writes, dgates = sums[:4]
        dks_ref[blk, :] = dks.astype(dks_ref.dtype)
        dvs_ref[blk, :] = dvs.astype(dvs_ref.dtype)
        if chunk_state_grads:
            state_k_ref[...] = sums[4].astype(state_k_ref.dtype)
            state_v_ref[...] = sums[5].astype(state_v_ref.dtype)
        # exp(-G_p) in each pair weight gives its key row p the gradient -s_p * d_writes[p].
        dlog_gates_ref[blk, :] = _log_gate_grad(dgates - writes * d_writes, d_writes, writes)

        if r0 + sub < chunk:
            last_run = run_ref[t0 + sub - 1]
            to_last, decay = _handover(gates, jnp.sum(log_gates, axis=0), run_q, state_run, last_run)
            state.advance(decay, (writes * to_last).astype(dtype), ks, vs)
            state_run = last_run


def _window_query_grad(qr, d_out, lse, delta, t0, rows, heads, seg_ref, kr_ref, v_ref, *, key_block, window,
                       scale):
    """The window branch's dq of `rows` tokens from t0 (S = heads query heads stacked, `_per_row`): qr, d_out
    [rows * S, d], lse, delta [rows * S]; seg_ref [Tp] window run ids, kr_ref [Tp, dk], v_ref [Tp, dv] the kv head's
    rotated keys and values. Loops over the key blocks the rows see, recomputing the window probabilities from lse.
    Returns [rows * S, dk] float32."""
    t_idx = t0 + jnp.arange(rows * heads) // heads
    seg_q = _per_row(seg_ref[pl.ds(t0, rows)], heads)
    key_rows = jnp.arange(key_block)

    def window_step(kb, dqr):
        cols = pl.ds(kb * key_block, key_block)
        j_idx = kb * key_block + key_rows
        visible = ((j_idx[None, :] <= t_idx[:, None]) & (j_idx[None, :] > t_idx[:, None] - window)
                   & (seg_ref[cols][None, :] == seg_q[:, None]))
        keys = kr_ref[cols, :]
        s = jnp.where(visible, _dot(qr, keys, trans_b=True) * scale, _MASK_VALUE)
        p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (_dot(d_out, v_ref[cols, :], trans_b=True) - delta[:, None])
        return dqr + _dot(ds.astype(qr.dtype), keys)

    first = jnp.maximum(t0 - window + 1, 0) // key_block
    last = (t0 + rows - 1) // key_block
    dqr = jax.lax.fori_loop(first, last + 1, window_step, jnp.zeros((rows * heads, qr.shape[-1]), jnp.float32))
    return scale * dqr


def _window_dq_kernel(qr_ref, do_ref, lse_ref, delta_ref, seg_ref, kr_ref, v_ref, dqr_ref, *, chunk, key_block,
                      window, scale):
    """The window dq of one (batch, block of S query heads, chunk) in a pass of its own
    (TritonConfig.separate_window_dq): qr, do [C, S, d], lse, delta [C, S], the kv head's kr [Tp, dk], v [Tp, dv],
    seg [Tp]. Output dqr [C, S, dk]."""
    heads = _heads_of(qr_ref)
    blk = pl.ds(0, chunk)
    dqr = _window_query_grad(_load_rows(qr_ref, blk, heads), _load_rows(do_ref, blk, heads),
                             _load_rows(lse_ref, blk, heads), _load_rows(delta_ref, blk, heads),
                             pl.program_id(2) * chunk, chunk, heads, seg_ref, kr_ref, v_ref, key_block=key_block,
                             window=window, scale=scale)
    _store_rows(dqr_ref, blk, dqr, heads)


def _sub_block_runs(run_ref, c0, r0, sub):
    """The run of the state entering sub-block r0 of the chunk starting at c0, and of its last row (run_ref [Tp])."""
    state_run = run_ref[jnp.maximum(c0 + r0 - 1, 0)] if r0 > 0 else jnp.where(
        c0 > 0, run_ref[jnp.maximum(c0 - 1, 0)], 0)
    return state_run, run_ref[c0 + r0 + sub - 1]


def _sub_block_handover(log_gates_ref, run_ref, c0, r0, sub):
    """Rows, write strengths, to_last and decay (`_handover`) of sub-block r0 of the chunk starting at c0, from the
    whole sequence's log_gates_ref [Tp, m] and run_ref [Tp]."""
    rows = pl.ds(c0 + r0, sub)
    log_gates = log_gates_ref[rows, :]
    gates, writes = _local_gates(log_gates)
    to_last, decay = _handover(gates, jnp.sum(log_gates, axis=0), run_ref[rows],
                               *_sub_block_runs(run_ref, c0, r0, sub))
    return rows, writes, to_last, decay


def _write_term_grads(ks, vs, writes, to_last, dhk, dhv):
    """Backward of a hand-over's write term (writes * to_last)^T @ (ks | vs) (`_handover`), given the gradient dhk
    [dk, m], dhv [m, dv] (inputs' dtype) of the state it adds to: ks [R, dk], vs [R, dv], writes, to_last [R, m].
    Returns float32 dks [R, dk], dvs [R, dv], dwrites [R, m], and weight_gates [R, m] = d_weights * weights: minus
    the gradient of each row's own gate through to_last (their sum over rows goes to the last row's gate)."""
    weights = writes * to_last
    dks = _dot(weights.astype(dhk.dtype), dhk, trans_b=True)
    dvs = _dot(weights.astype(dhk.dtype), dhv)
    d_weights = _dot(ks, dhk) + _dot(vs, dhv, trans_b=True)  # [R, m]
    return dks, dvs, d_weights * to_last, d_weights * weights


def _add_query_state_grads(dhk, dhv, q_ref, do_ref, a_ref, p_ref, rows):
    """dH^k += q^T a, dH^v += p^T do over `rows` of every query head of the program (the gradient that the rows'
    slot logits and slot reads give the state entering their sub-block). q, do [Tp, G, d]; a, p [Tp, G, m]."""
    dtype = q_ref.dtype
    for h in range(q_ref.shape[1]):
        dhk += _dot(q_ref[rows, h, :], a_ref[rows, h, :].astype(dtype), trans_a=True)
        dhv += _dot(p_ref[rows, h, :].astype(dtype), do_ref[rows, h, :], trans_a=True)
    return dhk, dhv


def _state_grad_kernel(q_ref, do_ref, a_ref, p_ref, gate_sums_ref, run_ref, dhk_last_ref, dhv_last_ref,
                       dhk_ref, dhv_ref, dhk0_ref, dhv0_ref, *, chunk, sub, num_chunks):
    """The gradient of the slot state leaving every chunk, for one (batch, owner, slice of dk and dv): the reverse of
    `_state_kernel`, carrying only dH^k, dH^v from the last sub-block to the first.

    q [Tp, G, dk], do [Tp, G, dv]; a, p [Tp, G, m] from `_output_backward_kernel` (G = query heads per program);
    gate_sums [Tp / sub, m] each sub-block's summed log gates (its decay: one row to load in the dependent chain,
    not a tile to sum), run [Tp] the kv head's; dhk_last [dk, m], dhv_last [m, dv] the gradient of the final state.
    Per sub-block, backwards: dH <- decay * dH + q^T a (and p^T do), whose dots do not depend on the carry. Outputs
    dhk [nC, dk, m], dhv [nC, m, dv] (the state leaving chunk c, in the chunk states' dtype: they feed
    `_state_backward_kernel`'s dots) and float32 dhk0, dhv0 (the initial state's).
    """

    def body(i, carry):
        dhk, dhv = carry
        c = num_chunks - 1 - i
        dhk_ref[c, :, :] = dhk.astype(dhk_ref.dtype)
        dhv_ref[c, :, :] = dhv.astype(dhv_ref.dtype)
        for r0 in reversed(range(0, chunk, sub)):
            state_run, last_run = _sub_block_runs(run_ref, c * chunk, r0, sub)
            gate_sum = gate_sums_ref[c * (chunk // sub) + r0 // sub, :]
            decay = jnp.where(state_run == last_run, jnp.exp(gate_sum), 0.0)
            rows = pl.ds(c * chunk + r0, sub)
            dhk, dhv = _add_query_state_grads(dhk * decay[None, :], dhv * decay[:, None], q_ref, do_ref, a_ref,
                                              p_ref, rows)
        return dhk, dhv

    dhk, dhv = jax.lax.fori_loop(0, num_chunks, body, (dhk_last_ref[...], dhv_last_ref[...]))
    dhk0_ref[...] = dhk
    dhv0_ref[...] = dhv


def _state_backward_kernel(q_ref, do_ref, a_ref, p_ref, ks_ref, vs_ref, log_gates_ref, run_ref,
                           hk_ref, hv_ref, dhk_ref, dhv_ref, dks_ref, dvs_ref, dlog_gates_ref, *, chunk, sub):
    """The gradients through the slot-state hand-over of one (batch, owner, chunk), given the gradient of the state
    leaving the chunk (`_state_grad_kernel`): parallel over chunks.

    q, do, a, p [Tp, G, ...], ks [Tp, dk], vs [Tp, dv], log_gates [Tp, m], run [Tp] as `_state_grad_kernel`
    and the forward; hk [dk, m], hv [m, dv] the forward's state entering the chunk; dhk [dk, m], dhv [m, dv] the
    gradient of the state leaving it. Walks the forward's sub-blocks last to first (H_next = decay * H +
    (writes * to_last)^T @ (ks | vs)), recomputing the state at inner sub-block boundaries and carrying dH back
    over them. Outputs the chunk's dks [C, dk], dvs [C, dv] (inputs' dtype) and float32 dlog_gates [C, m]
    (`_log_gate_grad`). q, do, a, p are read only with several sub-blocks per chunk.
    """
    dtype = ks_ref.dtype
    c0 = pl.program_id(2) * chunk
    last_row = (jnp.arange(sub) == sub - 1)[:, None]
    dhk, dhv = dhk_ref[...].astype(jnp.float32), dhv_ref[...].astype(jnp.float32)
    for r0 in reversed(range(0, chunk, sub)):
        # The state entering this sub-block: the chunk's stored state advanced over the sub-blocks before it.
        hk, hv = hk_ref[...].astype(jnp.float32), hv_ref[...].astype(jnp.float32)
        for earlier in range(0, r0, sub):
            rows, writes, to_last, decay = _sub_block_handover(log_gates_ref, run_ref, c0, earlier, sub)
            weights = (writes * to_last).astype(dtype)
            hk = hk * decay[None, :] + _dot(ks_ref[rows, :], weights, trans_a=True)
            hv = hv * decay[:, None] + _dot(weights, vs_ref[rows, :], trans_a=True)
        rows, writes, to_last, decay = _sub_block_handover(log_gates_ref, run_ref, c0, r0, sub)
        dks, dvs, dwrites, weight_gates = _write_term_grads(ks_ref[rows, :], vs_ref[rows, :], writes, to_last,
                                                            dhk.astype(dtype), dhv.astype(dtype))
        out_rows = pl.ds(r0, sub)
        dks_ref[out_rows, :] = dks.astype(dks_ref.dtype)
        dvs_ref[out_rows, :] = dvs.astype(dvs_ref.dtype)
        decay_grad = (jnp.sum(dhk * hk, axis=0) + jnp.sum(dhv * hv, axis=1)) * decay  # d/dG_last
        last_grad = jnp.sum(weight_gates, axis=0) + decay_grad
        dgates = jnp.where(last_row, last_grad[None, :], 0.0) - weight_gates
        dlog_gates_ref[out_rows, :] = _log_gate_grad(dgates, dwrites, writes)
        if r0 > 0:
            dhk, dhv = _add_query_state_grads(dhk * decay[None, :], dhv * decay[:, None], q_ref, do_ref, a_ref,
                                              p_ref, rows)


def _window_backward_kernel(qr_ref, do_ref, lse_ref, delta_ref, seg_ref, kr_ref, v_ref, dkr_ref, dv_ref, *,
                            key_block, query_block, window, scale):
    """Window dk and dv for one (batch, block of S query heads of one GQA group, block of keys), parallel over key
    blocks (no atomics).

    qr [Tp, S, dk], do [Tp, S, dv], lse, delta [Tp, S] these heads' rotated queries, output gradients and row
    statistics; seg [Tp] window run ids; kr [K, dk], v [K, dv] this block's keys and values. Walks the query blocks
    that can see the keys (t in [j, j + W)), the S heads' queries stacked as in the output kernels. Outputs dkr
    [K, dk], dv [K, dv] in the inputs' dtype, summed over the S heads (in float32).
    """
    heads = _heads_of(qr_ref)
    kb = pl.program_id(2)
    j0 = kb * key_block
    t_pad = qr_ref.shape[0]
    j_idx = j0 + jnp.arange(key_block)
    column_token = jnp.arange(query_block * heads) // heads
    seg_k = seg_ref[pl.ds(j0, key_block)]
    keys, values = kr_ref[...], v_ref[...]
    dtype = keys.dtype

    def query_step(qb, carry):
        dk, dv = carry
        rows = pl.ds(qb * query_block, query_block)
        t_idx = qb * query_block + column_token
        visible = ((t_idx[None, :] >= j_idx[:, None]) & (t_idx[None, :] < j_idx[:, None] + window)
                   & (_per_row(seg_ref[rows], heads)[None, :] == seg_k[:, None]))  # [key, stacked query]
        qr, d_out = _load_rows(qr_ref, rows, heads), _load_rows(do_ref, rows, heads)
        s = jnp.where(visible, _dot(keys, qr, trans_b=True) * scale, _MASK_VALUE)
        p = jnp.where(visible, jnp.exp(s - _load_rows(lse_ref, rows, heads)[None, :]), 0.0)
        ds = p * (_dot(values, d_out, trans_b=True) - _load_rows(delta_ref, rows, heads)[None, :])
        return dk + _dot(ds.astype(dtype), qr), dv + _dot(p.astype(dtype), d_out)

    first = j0 // query_block
    last = jnp.minimum(j0 + key_block + window - 2, t_pad - 1) // query_block
    init = (jnp.zeros(dkr_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(first, last + 1, query_step, init)
    dkr_ref[...] = (scale * dk).astype(dkr_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Launchers of the core problem (inputs prepared by `_prepare`).


def _slot_states(ks, vs, log_gates, hk0, hv0, run, *, chunk, config, interpret):
    """Launches _state_kernel: (hk [B, nC, Hkv, dk, m], hv [B, nC, Hkv, m, dv], hk_final, hv_final).

    The chunk states hk, hv are stored in the inputs' dtype when config.input_dtype_states (the output kernels
    round them to it before every dot anyway; this halves their bytes for bf16), else float32; the final states
    are float32. The grid is (B, Hkv, splits): each program owns dk/splits rows of H^k and dv/splits columns of
    H^v, so that small batches still fill the GPU (the chunk loop inside a program is sequential).
    """
    batch, t_pad, kv_heads, dk = ks.shape
    dv, m = vs.shape[3], log_gates.shape[3]
    num_chunks = t_pad // chunk
    splits = _state_splits(dk, dv, config)
    dk_part, dv_part = dk // splits, dv // splits
    state_dtype = ks.dtype if config.input_dtype_states else jnp.float32

    def per_token(width, split):
        return pl.BlockSpec((None, t_pad, None, width), lambda b, g, i: (b, 0, g, i if split else 0))

    def per_head(*shape, split_axis):
        def index(b, g, i):
            return (b, g) + tuple(i if axis == split_axis else 0 for axis in range(len(shape)))
        return pl.BlockSpec((None, None, *shape), index)

    return pl.pallas_call(
        functools.partial(_state_kernel, chunk=chunk, num_chunks=num_chunks),
        grid=(batch, kv_heads, splits),
        in_specs=[per_token(dk_part, True), per_token(dv_part, True), per_token(m, False),
                  pl.BlockSpec((None, t_pad), lambda b, g, i: (b, 0)),
                  per_head(dk_part, m, split_axis=0), per_head(m, dv_part, split_axis=1)],
        out_specs=[pl.BlockSpec((None, num_chunks, None, dk_part, m), lambda b, g, i: (b, 0, g, i, 0)),
                   pl.BlockSpec((None, num_chunks, None, m, dv_part), lambda b, g, i: (b, 0, g, 0, i)),
                   per_head(dk_part, m, split_axis=0), per_head(m, dv_part, split_axis=1)],
        out_shape=[jax.ShapeDtypeStruct((batch, num_chunks, kv_heads, dk, m), state_dtype),
                   jax.ShapeDtypeStruct((batch, num_chunks, kv_heads, m, dv), state_dtype),
                   jax.ShapeDtypeStruct((batch, kv_heads, dk, m), jnp.float32),
                   jax.ShapeDtypeStruct((batch, kv_heads, m, dv), jnp.float32)],
        compiler_params=_compiler_params(config.state_warps, config.state_stages),
        interpret=interpret,
        name="nha_slot_state",
    )(ks, vs, log_gates, run, hk0, hv0)


def _stacked_heads(group: int, sub: int, stacked_rows: int) -> int:
    """Query heads per program of the output kernels: the largest power of two dividing the GQA group whose rows,
    stacked, fit stacked_rows (TritonConfig.stacked_rows; at least 1)."""
    heads = 1
    while group % (2 * heads) == 0 and 2 * heads * sub <= stacked_rows:
        heads *= 2
    return heads


class _ChunkSpecs:
    """BlockSpecs of the (B, H / S, T/C) grid shared by the output kernel and its backward, whose programs own S
    query heads of one GQA group: per block of query heads and chunk (values [.., S, width] or row statistics
    [.., S]), per program and chunk, per kv head and chunk, a kv head's whole sequence, a chunk's slot state (of
    its kv head, or per program), and a row's per-token run ids."""

    def __init__(self, t_pad: int, chunk: int, group: int, heads: int):
        self.t_pad, self.chunk, self.heads = t_pad, chunk, heads
        self.kv_head = lambda h: h * heads // group
        self.runs = pl.BlockSpec((None, t_pad), lambda b, h, c: (b, 0))
        self.row_stats = pl.BlockSpec((None, chunk, _head_block(heads)), lambda b, h, c: (b, c, h))

    def query_chunk(self, width):
        return pl.BlockSpec((None, self.chunk, _head_block(self.heads), width), lambda b, h, c: (b, c, h, 0))

    def program_chunk(self, width):
        return pl.BlockSpec((None, self.chunk, None, width), lambda b, h, c: (b, c, h, 0))

    def kv_chunk(self, width):
        return pl.BlockSpec((None, self.chunk, None, width), lambda b, h, c: (b, c, self.kv_head(h), 0))

    def kv_all(self, width):
        return pl.BlockSpec((None, self.t_pad, None, width), lambda b, h, c: (b, 0, self.kv_head(h), 0))

    def chunk_state(self, *shape):
        return pl.BlockSpec((None, None, None, *shape), lambda b, h, c: (b, c, self.kv_head(h), 0, 0))

    def program_state(self, *shape):
        return pl.BlockSpec((None, None, None, *shape), lambda b, h, c: (b, c, h, 0, 0))


def _output_grid(q, ks, chunk, config):
    """(sub-block rows, query heads per program, _ChunkSpecs, grid) of the output kernels (and the window dq)."""
    batch, t_pad, heads, _ = q.shape
    sub = min(config.sub_block, chunk)
    per_program = _stacked_heads(heads // ks.shape[2], sub, config.stacked_rows)
    specs = _ChunkSpecs(t_pad, chunk, heads // ks.shape[2], per_program)
    return sub, per_program, specs, (batch, heads // per_program, t_pad // chunk)


def _launch_output_kernel(body, name, inputs, in_specs, out_specs, out_shape, *, log_gates, chunk, sub, specs,
                          grid, num_slots, config, warps, stages, interpret):
    """Runs an output kernel `body` over `grid` with its pair terms as `_pair_kernel` gives them: a pass in the
    factored form, then a pass in the elementwise form that redoes only the chunks `_strong_chunks` flags, writing
    in place over the first pass's outputs (input_output_aliases), so that neither pass branches between the forms.
    With config.factored_pairs False (or no slots), one pass in one form. Returns the outputs (a list)."""
    strong = _strong_chunks(log_gates, chunk, sub)
    strong_spec = pl.BlockSpec((None, None, 1), lambda b, h, c: (b, c, specs.kv_head(h)))

    def launch(pairs, previous=()):
        return pl.pallas_call(
            _pair_kernel(body, pairs, len(inputs), len(previous)),
            grid=grid,
            in_specs=[strong_spec, *in_specs, *out_specs[:len(previous)]],
            out_specs=out_specs,
            out_shape=out_shape,
            input_output_aliases={1 + len(inputs) + i: i for i in range(len(previous))},
            compiler_params=_compiler_params(warps, stages),
            interpret=interpret,
            name=name if pairs != "fallback" else f"{name}_strong_gates",
        )(strong, *inputs, *previous)

    if not config.factored_pairs:
        return launch("elementwise")
    first = launch("factored")
    return first if num_slots == 0 else launch("fallback", first)


def _outputs(q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, *,
             window, num_slots, scale, chunk, config, interpret):
    """Launches _output_kernel over (B, H / S, T/C): o [B, Tp, H, dv] in q.dtype and lse [B, Tp, H] float32."""
    batch, t_pad, heads, dk = q.shape
    dv, m = vs.shape[3], log_gates.shape[3]
    sub, _, specs, grid = _output_grid(q, ks, chunk, config)
    return _launch_output_kernel(
        functools.partial(_output_kernel, chunk=chunk, sub=sub, key_block=min(config.key_block, chunk),
                          window=window, num_slots=num_slots, scale=scale),
        "nha_output", (q, qr, ks, vs, log_gates, hk, hv, kr, v, seg, run),
        in_specs=[specs.query_chunk(dk), specs.query_chunk(dk), specs.kv_chunk(dk), specs.kv_chunk(dv),
                  specs.kv_chunk(m), specs.chunk_state(dk, m), specs.chunk_state(m, dv),
                  specs.kv_all(dk), specs.kv_all(dv), specs.runs, specs.runs],
        out_specs=[specs.query_chunk(dv), specs.row_stats],
        out_shape=[jax.ShapeDtypeStruct((batch, t_pad, heads, dv), q.dtype),
                   jax.ShapeDtypeStruct((batch, t_pad, heads), jnp.float32)],
        log_gates=log_gates, chunk=chunk, sub=sub, specs=specs, grid=grid, num_slots=num_slots, config=config,
        warps=config.output_warps, stages=config.output_stages, interpret=interpret)


def _output_backward(q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, d_out, lse, delta, *,
                     window, num_slots, scale, chunk, config, interpret, chunk_state_grads=False):
    """Launches _output_backward_kernel over (B, H / S, T/C). d_out [B, Tp, H, dv] (q.dtype), lse, delta
    [B, Tp, H].

    Returns (dq, dks, dvs, dlog_gates, state_k, state_v, dqr): per query head, in q.dtype (the custom_vjp rounds
    them to it anyway), dq [B, Tp, H, dk]; per program (summed over its S query heads; the launcher sums the rest of
    each GQA group): dks [B, Tp, H / S, dk], dvs [B, Tp, H / S, dv] in q.dtype, dlog_gates [B, Tp, H / S, m]
    float32 (`_log_gate_grad`); the state's share (see the kernel): a, p [B, Tp, H, m] in
    q.dtype (the state backward's dot operands), or with chunk_state_grads the gradients of the states entering each
    chunk per program, dhk [B, nC, H / S, dk, m] and dhv [B, nC, H / S, m, dv] in hk.dtype; and the window dq
    [B, Tp, H, dk] in q.dtype, None when W = 0 or config.separate_window_dq (`_window_dq` then).
    """
    batch, t_pad, heads, dk = q.shape
    dv, m = vs.shape[3], log_gates.shape[3]
    sub, per_program, specs, grid = _output_grid(q, ks, chunk, config)
    query_chunk, program_chunk = specs.query_chunk, specs.program_chunk
    per_head = lambda width: jax.ShapeDtypeStruct((batch, t_pad, heads, width), q.dtype)
    per_program_out = lambda width, dtype=jnp.float32: jax.ShapeDtypeStruct((batch, t_pad, heads // per_program,
                                                                             width), dtype)
    if chunk_state_grads:
        if sub != chunk:
            raise ValueError(f"chunk_state_grads needs one sub-block per chunk, got sub-blocks of {sub} in {chunk}")
        per_chunk = lambda *shape: jax.ShapeDtypeStruct((batch, t_pad // chunk, heads // per_program, *shape),
                                                        hk.dtype)
        state_specs = [specs.program_state(dk, m), specs.program_state(m, dv)]
        state_shapes = [per_chunk(dk, m), per_chunk(m, dv)]
    else:
        state_specs, state_shapes = [query_chunk(m), query_chunk(m)], [per_head(m), per_head(m)]
    window_here = window > 0 and not config.separate_window_dq
    window_specs, window_shapes = ([query_chunk(dk)], [per_head(dk)]) if window_here else ([], [])
    grads = _launch_output_kernel(
        functools.partial(_output_backward_kernel, chunk=chunk, sub=sub, key_block=min(config.key_block, chunk),
                          window=window, num_slots=num_slots, scale=scale, chunk_state_grads=chunk_state_grads,
                          passes=math.gcd(config.backward_head_passes, per_program)),
        "nha_output_backward", (q, qr, ks, vs, log_gates, hk, hv, kr, v, seg, run, d_out, lse, delta),
        in_specs=[query_chunk(dk), query_chunk(dk), specs.kv_chunk(dk), specs.kv_chunk(dv), specs.kv_chunk(m),
                  specs.chunk_state(dk, m), specs.chunk_state(m, dv), specs.kv_all(dk),
                  specs.kv_all(dv), specs.runs, specs.runs, query_chunk(dv), specs.row_stats, specs.row_stats],
        out_specs=[query_chunk(dk), program_chunk(dk), program_chunk(dv), program_chunk(m), *state_specs,
                   *window_specs],
        out_shape=[per_head(dk), per_program_out(dk, q.dtype), per_program_out(dv, q.dtype), per_program_out(m),
                   *state_shapes, *window_shapes],
        log_gates=log_gates, chunk=chunk, sub=sub, specs=specs, grid=grid, num_slots=num_slots, config=config,
        warps=config.backward_warps, stages=config.backward_stages,
        interpret=interpret)
    return (*grads[:6], grads[6] if window_here else None)


def _window_dq(qr, kr, v, d_out, lse, delta, seg, *, window, scale, chunk, config, interpret):
    """Launches _window_dq_kernel over the output kernels' grid: dqr [B, Tp, H, dk] in qr.dtype."""
    _, _, specs, grid = _output_grid(qr, kr, chunk, config)
    dk, dv = qr.shape[3], v.shape[3]
    return pl.pallas_call(
        functools.partial(_window_dq_kernel, chunk=chunk, key_block=min(config.key_block, chunk), window=window,
                          scale=scale),
        grid=grid,
        in_specs=[specs.query_chunk(dk), specs.query_chunk(dv), specs.row_stats, specs.row_stats, specs.runs,
                  specs.kv_all(dk), specs.kv_all(dv)],
        out_specs=specs.query_chunk(dk),
        out_shape=jax.ShapeDtypeStruct(qr.shape, qr.dtype),
        compiler_params=_window_compiler_params(config),
        interpret=interpret,
        name="nha_window_dq",
    )(qr, d_out, lse, delta, seg, kr, v)


def _heads_per_state_program(group: int, kv_programs: int, config) -> int:
    """Query heads per program of the state backward: the whole GQA group (whose states are one kv head's) when
    Triton can hold it in one block (a power of two) and the kv_programs (batch x kv heads x splits) are enough
    (config.grouped_state_backward_programs), else 1."""
    grouped = group & (group - 1) == 0 and kv_programs >= config.grouped_state_backward_programs
    return group if grouped else 1


def _state_splits(dk, dv, config):
    return max(1, min(config.state_splits, dk // _MIN_DIM, dv // _MIN_DIM))


def _state_backward(q, d_out, a, p, ks, vs, log_gates, run, hk, hv, dhk_last, dhv_last, *,
                    chunk, config, interpret):
    """The gradients through the slot-state recurrence in two launches: `_state_grad_kernel` over (B, owners,
    splits of dk and dv), sequential over chunks (last first), gives the gradient of the state leaving each chunk;
    `_state_backward_kernel` over (B, owners, chunks), parallel, gives the rest from it.

    An owner is a kv head when `_heads_per_state_program` takes the whole GQA group, else a query head.
    q [B, Tp, H, dk], d_out [B, Tp, H, dv]; a, p [B, Tp, H, m]; ks, vs, log_gates, run as the forward; hk, hv
    the forward's states entering each chunk [B, nC, Hkv, ...]; dhk_last [B, owners, dk, m], dhv_last
    [B, owners, m, dv] the final-state gradient given to each owner. Returns per owner: dks [B, Tp, owners, dk],
    dvs [B, Tp, owners, dv] in ks.dtype; float32 dlog_gates [B, Tp, owners, m] (`_log_gate_grad`), dhk0
    [B, owners, dk, m], dhv0 [B, owners, m, dv].
    """
    batch, t_pad, heads, dk = q.shape
    kv_heads, dv, m = ks.shape[2], vs.shape[3], log_gates.shape[3]
    group = heads // kv_heads
    num_chunks = t_pad // chunk
    sub = min(config.sub_block, chunk)
    splits = _state_splits(dk, dv, config)
    dk_part, dv_part = dk // splits, dv // splits
    per_program = _heads_per_state_program(group, batch * kv_heads * splits, config)
    owners = heads // per_program
    f32 = jnp.float32
    params = _compiler_params(config.state_warps, config.state_stages)

    def kv_head(o):
        return o * per_program // group

    def head_tokens(width, split=False):  # the owner's query heads, all tokens
        return pl.BlockSpec((None, t_pad, per_program, width), lambda b, o, i: (b, 0, o, i if split else 0))

    def kv_tokens(width):
        return pl.BlockSpec((None, t_pad, None, width), lambda b, o, i: (b, 0, kv_head(o), 0))

    def owner_states(*shape, split_axis):  # [B, nC, owners, *shape], all chunks, shape's split_axis sliced
        def index(b, o, i):
            return (b, 0, o) + tuple(i if axis == split_axis else 0 for axis in range(len(shape)))
        return pl.BlockSpec((None, num_chunks, None, *shape), index)

    def owner_state(*shape, split_axis):
        def index(b, o, i):
            return (b, o) + tuple(i if axis == split_axis else 0 for axis in range(len(shape)))
        return pl.BlockSpec((None, None, *shape), index)

    runs = pl.BlockSpec((None, t_pad), lambda b, o, i: (b, 0))
    gate_sums = _block_sums(log_gates, sub)
    dhk, dhv, dhk0, dhv0 = pl.pallas_call(
        functools.partial(_state_grad_kernel, chunk=chunk, sub=sub, num_chunks=num_chunks),
        grid=(batch, owners, splits),
        in_specs=[head_tokens(dk_part, True), head_tokens(dv_part, True), head_tokens(m), head_tokens(m),
                  pl.BlockSpec((None, t_pad // sub, None, m), lambda b, o, i: (b, 0, kv_head(o), 0)), runs,
                  owner_state(dk_part, m, split_axis=0), owner_state(m, dv_part, split_axis=1)],
        out_specs=[owner_states(dk_part, m, split_axis=0), owner_states(m, dv_part, split_axis=1),
                   owner_state(dk_part, m, split_axis=0), owner_state(m, dv_part, split_axis=1)],
        out_shape=[jax.ShapeDtypeStruct((batch, num_chunks, owners, dk, m), hk.dtype),
                   jax.ShapeDtypeStruct((batch, num_chunks, owners, m, dv), hk.dtype),
                   jax.ShapeDtypeStruct((batch, owners, dk, m), f32),
                   jax.ShapeDtypeStruct((batch, owners, m, dv), f32)],
        compiler_params=params,
        interpret=interpret,
        name="nha_state_grad",
    )(q, d_out, a, p, gate_sums, run, dhk_last, dhv_last)

    def chunk_state(owner_axis):  # [B, nC, owners or Hkv, *shape]: this program's chunk
        def spec(*shape):
            return pl.BlockSpec((None, None, None, *shape),
                                lambda b, o, c: (b, c, owner_axis(o)) + (0,) * len(shape))
        return spec

    def owner_rows(width):
        return pl.BlockSpec((None, chunk, None, width), lambda b, o, c: (b, c, o, 0))

    dks, dvs, dlog_gates = pl.pallas_call(
        functools.partial(_state_backward_kernel, chunk=chunk, sub=sub),
        grid=(batch, owners, num_chunks),
        in_specs=[head_tokens(dk), head_tokens(dv), head_tokens(m), head_tokens(m), kv_tokens(dk), kv_tokens(dv),
                  kv_tokens(m), runs, chunk_state(kv_head)(dk, m), chunk_state(kv_head)(m, dv),
                  chunk_state(lambda o: o)(dk, m), chunk_state(lambda o: o)(m, dv)],
        out_specs=[owner_rows(dk), owner_rows(dv), owner_rows(m)],
        out_shape=[jax.ShapeDtypeStruct((batch, t_pad, owners, dk), ks.dtype),
                   jax.ShapeDtypeStruct((batch, t_pad, owners, dv), ks.dtype),
                   jax.ShapeDtypeStruct((batch, t_pad, owners, m), f32)],
        compiler_params=params,
        interpret=interpret,
        name="nha_state_backward",
    )(q, d_out, a, p, ks, vs, log_gates, run, hk, hv, dhk, dhv)
    return dks, dvs, dlog_gates, dhk0, dhv0


def _window_backward(qr, kr, v, d_out, lse, delta, seg, *, window, scale, chunk, config, interpret):
    """Launches _window_backward_kernel over (B, H / S, Tp / key block), S query heads of one GQA group per program
    (as the output kernels stack them): dkr [B, Tp, H / S, dk], dv [B, Tp, H / S, dv] in kr.dtype (the launcher sums
    the rest of each GQA group)."""
    batch, t_pad, heads, dk = qr.shape
    kv_heads, dv = kr.shape[2], v.shape[3]
    group = heads // kv_heads
    block = min(config.key_block, chunk)
    per_program = _stacked_heads(group, block, config.stacked_rows)

    def heads_all(*widths):
        return pl.BlockSpec((None, t_pad, _head_block(per_program), *widths),
                            lambda b, h, kb: (b, 0, h) + (0,) * len(widths))

    def kv_block(width):
        return pl.BlockSpec((None, block, None, width), lambda b, h, kb: (b, kb, h * per_program // group, 0))

    def out_block(width):
        return pl.BlockSpec((None, block, None, width), lambda b, h, kb: (b, kb, h, 0))

    return pl.pallas_call(
        functools.partial(_window_backward_kernel, key_block=block, query_block=block, window=window, scale=scale),
        grid=(batch, heads // per_program, t_pad // block),
        in_specs=[heads_all(dk), heads_all(dv), heads_all(), heads_all(),
                  pl.BlockSpec((None, t_pad), lambda b, h, kb: (b, 0)), kv_block(dk), kv_block(dv)],
        out_specs=[out_block(dk), out_block(dv)],
        out_shape=[jax.ShapeDtypeStruct((batch, t_pad, heads // per_program, dk), kr.dtype),
                   jax.ShapeDtypeStruct((batch, t_pad, heads // per_program, dv), kr.dtype)],
        compiler_params=_window_compiler_params(config),
        interpret=interpret,
        name="nha_window_backward",
    )(qr, d_out, lse, delta, seg, kr, v)


def _forward(q, qr, kr, v, ks, vs, log_gates, hk0, hv0, seg, run, *,
             window, num_slots, scale, chunk, interpret, config):
    """Forward of the core problem (shapes in `_core`). Returns (o, lse [B, Tp, H], hk [B, nC, Hkv, dk, m],
    hv [B, nC, Hkv, m, dv] the states entering each chunk, hk_final, hv_final).

    config: the tuning.TritonConfig (its chunk is ignored: `chunk` is fixed by the preparation's padding).
    """
    hk, hv, hk_final, hv_final = _slot_states(ks, vs, log_gates, hk0, hv0, run, chunk=chunk, config=config,
                                              interpret=interpret)
    out, lse = _outputs(q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, window=window, num_slots=num_slots,
                        scale=scale, chunk=chunk, config=config, interpret=interpret)
    return out, lse, hk, hv, hk_final, hv_final


def _xla_precision(dtype):
    """Float32 inputs get exact float32 matmuls in XLA too (XLA:GPU would otherwise use tf32), as in the kernels."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _chunks_per_step(num_chunks: int, most: int) -> int:
    """Chunks per step of a loop over chunks (the largest power of two <= most dividing num_chunks): a step issues
    all its chunks' loads (and dots) that do not depend on the carried state before the dependent chain, so that
    their latencies overlap."""
    unroll = 1
    while unroll < most and num_chunks % (2 * unroll) == 0:
        unroll *= 2
    return unroll


def _chunk_scan_kernel(decay_ref, local_ref, init_ref, entering_ref, final_ref, *, num_chunks, decay_axis, unroll):
    """One (batch, kv head, tile of the state): H_{c+1} = decay_c * H_c + L_c over the chunks, elementwise.

    decay [nC, n] the tile's slots' decays; local [nC, r, n]; init [r, n] the state entering chunk 0. The
    slots run along the tile's columns (decay_axis 1: H^k [dk, m]) or rows (decay_axis 0: H^v [m, dv]). Outputs
    entering [nC, r, n] (H_c, in its dtype) and final [r, n] (H_nC, float32).
    """
    expand = (lambda d: d[None, :]) if decay_axis == 1 else (lambda d: d[:, None])

    def step(i, state):
        first = i * unroll
        decays = [decay_ref[first + u, :] for u in range(unroll)]
        locals_ = [local_ref[first + u, :, :] for u in range(unroll)]
        for u in range(unroll):
            entering_ref[first + u, :, :] = state.astype(entering_ref.dtype)
            state = expand(decays[u]) * state + locals_[u].astype(jnp.float32)
        return state

    final_ref[...] = jax.lax.fori_loop(0, num_chunks // unroll, step, init_ref[...].astype(jnp.float32))


def _chunk_scan_backward_kernel(decay_ref, entering_ref, d_entering_ref, d_final_ref,
                                d_local_ref, d_decay_ref, d_init_ref, *, num_chunks, decay_axis, unroll):
    """Reverse of `_chunk_scan_kernel` for one (batch, kv head, tile): with D the gradient of the state leaving
    chunk c, dL_c = D, d decay_c = the tile's sum of D * H_c along the non-slot axis (a partial sum), and the
    gradient of the state entering chunk c is decay_c * D + dH_c (its direct uses).

    decay [nC, n]; entering, d_entering [nC, r, n] (H_c and its direct gradient); d_final [r, n] the gradient of
    H_nC. Outputs d_local [nC, r, n] (in its dtype), d_decay [nC, n] and d_init [r, n] float32.
    """
    expand = (lambda d: d[None, :]) if decay_axis == 1 else (lambda d: d[:, None])

    def step(i, grad):
        chunks = [num_chunks - 1 - i * unroll - u for u in range(unroll)]
        decays = [decay_ref[c, :] for c in chunks]
        states = [entering_ref[c, :, :].astype(jnp.float32) for c in chunks]
        direct = [d_entering_ref[c, :, :].astype(jnp.float32) for c in chunks]
        for c, decay, state, d_state in zip(chunks, decays, states, direct):
            d_local_ref[c, :, :] = grad.astype(d_local_ref.dtype)
            d_decay_ref[c, :] = jnp.sum(grad * state, axis=1 - decay_axis)
            grad = expand(decay) * grad + d_state
        return grad

    d_init_ref[...] = jax.lax.fori_loop(0, num_chunks // unroll, step, d_final_ref[...].astype(jnp.float32))


class _ChunkScanSpecs:
    """Grid (B, Hkv, row tiles, column tiles) and BlockSpecs of the chunk-scan kernels over states
    [B, nC, Hkv, rows, cols] (H^k [.., dk, m] with decay_axis 1, H^v [.., m, dv] with decay_axis 0) in tiles of
    config.scan_tile: per chunk, one state [B, Hkv, rows, cols], decays [B, nC, Hkv, m], and the partial decay
    gradients [tiles along the non-slot axis, B, nC, Hkv, m]."""

    def __init__(self, local_shape, decay_axis, config):
        batch, num_chunks, kv_heads, rows, cols = local_shape
        tile = (min(config.scan_tile[0], rows), min(config.scan_tile[1], cols))
        self.grid = (batch, kv_heads, rows // tile[0], cols // tile[1])
        self.partials = self.grid[3 - decay_axis]
        self.unroll = lambda most: _chunks_per_step(num_chunks, most)
        self.chunks = pl.BlockSpec((None, num_chunks, None, *tile), lambda b, g, i, j: (b, 0, g, i, j))
        self.state = pl.BlockSpec((None, None, *tile), lambda b, g, i, j: (b, g, i, j))
        slot_tile = lambda i, j: (j, i) if decay_axis == 1 else (i, j)  # (slot tile, the other tile)
        self.decay = pl.BlockSpec((None, num_chunks, None, tile[decay_axis]),
                                  lambda b, g, i, j: (b, 0, g, slot_tile(i, j)[0]))
        self.partial_decay = pl.BlockSpec((None, None, num_chunks, None, tile[decay_axis]),
                                          lambda b, g, i, j: (slot_tile(i, j)[1], b, 0, g, slot_tile(i, j)[0]))


def _chunk_scan_call(decay, local, init, decay_axis, state_dtype, config, interpret):
    specs = _ChunkScanSpecs(local.shape, decay_axis, config)
    return pl.pallas_call(
        functools.partial(_chunk_scan_kernel, num_chunks=local.shape[1], decay_axis=decay_axis,
                          unroll=specs.unroll(config.scan_unroll)),
        grid=specs.grid,
        in_specs=[specs.decay, specs.chunks, specs.state],
        out_specs=[specs.chunks, specs.state],
        out_shape=[jax.ShapeDtypeStruct(local.shape, state_dtype),
                   jax.ShapeDtypeStruct(init.shape, jnp.float32)],
        compiler_params=_compiler_params(config.scan_warps, 1),
        interpret=interpret,
        name="nha_chunk_scan",
    )(decay, local, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _chunk_scan(decay, local, init, decay_axis, state_dtype, config, interpret):
    """The slot states entering every chunk from each chunk's own contribution: H_0 = init,
    H_{c+1} = decay_c * H_c + local_c (the decay broadcast along the slot axis), in one pass.

    decay [B, nC, Hkv, m] float32, local [B, nC, Hkv, dk, m] (decay_axis 1) or [B, nC, Hkv, m, dv] (decay_axis 0)
    in state_dtype (its gradient comes in that dtype too), init [B, Hkv, ...] float32. Returns entering
    [B, nC, Hkv, ...] (H_0 .. H_{nC-1}) in state_dtype and final (H_nC) float32; the scan itself runs in float32.
    config: the tuning.TritonConfig (scan_tile, scan_unroll, scan_warps).
    """
    return _chunk_scan_call(decay, local, init, decay_axis, state_dtype, config, interpret)


def _chunk_scan_fwd(decay, local, init, decay_axis, state_dtype, config, interpret):
    entering, final = _chunk_scan_call(decay, local, init, decay_axis, state_dtype, config, interpret)
    entering_saved, = name_residuals(entering)
    return (entering, final), (decay, entering_saved)


def _chunk_scan_bwd(decay_axis, state_dtype, config, interpret, residuals, cotangents):
    decay, entering = residuals
    d_entering, d_final = cotangents
    specs = _ChunkScanSpecs(entering.shape, decay_axis, config)
    f32 = jnp.float32
    d_local, d_decay, d_init = pl.pallas_call(
        functools.partial(_chunk_scan_backward_kernel, num_chunks=entering.shape[1], decay_axis=decay_axis,
                          unroll=specs.unroll(config.scan_unroll // 2)),
        grid=specs.grid,
        in_specs=[specs.decay, specs.chunks, specs.chunks, specs.state],
        out_specs=[specs.chunks, specs.partial_decay, specs.state],
        out_shape=[jax.ShapeDtypeStruct(entering.shape, entering.dtype),
                   jax.ShapeDtypeStruct((specs.partials,) + decay.shape, f32),
                   jax.ShapeDtypeStruct(d_final.shape, f32)],
        compiler_params=_compiler_params(config.scan_warps, 1),
        interpret=interpret,
        name="nha_chunk_scan_backward",
    )(decay, entering, d_entering, d_final)
    return d_decay.sum(axis=0), d_local, d_init


_chunk_scan.defvjp(_chunk_scan_fwd, _chunk_scan_bwd)


def _chunk_contribution_kernel(ks_ref, vs_ref, log_gates_ref, run_ref, local_k_ref, local_v_ref):
    """One (batch, kv head, chunk): the chunk's own contribution to the slot state leaving it (the state that
    enters it taken as zero). ks [C, dk], vs [C, dv], log_gates [C, m] float32, run [C] as `_state_kernel`.
    Outputs local_k [dk, m] = (writes * to_last)^T-weighted ks, local_v [m, dv] likewise (in their dtype)."""
    _, writes, to_last, _ = _sub_block_handover(log_gates_ref, run_ref, 0, 0, run_ref.shape[0])
    weights = (writes * to_last).astype(ks_ref.dtype)
    local_k_ref[...] = _dot(ks_ref[...], weights, trans_a=True).astype(local_k_ref.dtype)
    local_v_ref[...] = _dot(weights, vs_ref[...], trans_a=True).astype(local_v_ref.dtype)


def _chunk_contribution_backward_kernel(ks_ref, vs_ref, log_gates_ref, run_ref, d_local_k_ref, d_local_v_ref,
                                        dks_ref, dvs_ref, dlog_gates_ref):
    """Backward of `_chunk_contribution_kernel` for one (batch, kv head, chunk): from d_local_k [dk, m] and
    d_local_v [m, dv], dks [C, dk], dvs [C, dv] (their dtype) and float32 dlog_gates [C, m] (`_log_gate_grad`),
    through weights_t = writes_t * exp(G_last - G_t) on the last row's run."""
    chunk = run_ref.shape[0]
    dtype = ks_ref.dtype
    _, writes, to_last, _ = _sub_block_handover(log_gates_ref, run_ref, 0, 0, chunk)
    dks, dvs, dwrites, weight_gates = _write_term_grads(ks_ref[...], vs_ref[...], writes, to_last,
                                                        d_local_k_ref[...].astype(dtype),
                                                        d_local_v_ref[...].astype(dtype))
    dks_ref[...] = dks.astype(dks_ref.dtype)
    dvs_ref[...] = dvs.astype(dvs_ref.dtype)
    last_row = (jnp.arange(chunk) == chunk - 1)[:, None]
    dgates = jnp.where(last_row, jnp.sum(weight_gates, axis=0)[None, :], 0.0) - weight_gates
    dlog_gates_ref[...] = _log_gate_grad(dgates, dwrites, writes)


def _chunk_contribution_specs(ks, chunk):
    """Grid (B, Hkv, chunks) and the BlockSpecs of the chunk-contribution kernels: per chunk rows of width n, run
    ids, and one chunk's state [rows, cols]."""
    batch, t_pad, kv_heads, _ = ks.shape
    rows = lambda n: pl.BlockSpec((None, chunk, None, n), lambda b, g, c: (b, c, g, 0))
    run = pl.BlockSpec((None, chunk), lambda b, g, c: (b, c))
    state = lambda r, n: pl.BlockSpec((None, None, None, r, n), lambda b, g, c: (b, c, g, 0, 0))
    return (batch, kv_heads, t_pad // chunk), rows, run, state


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunk_contributions(ks, vs, log_gates, run, chunk, state_dtype, config, interpret):
    """Each chunk's own contribution to the slot state leaving it, as `_scanned_chunk_states` needs them, in a
    Pallas kernel (TritonConfig.scan_contribution_kernel): XLA merges its batched matmuls over (ks | vs), then
    slices and transposes the result apart.

    ks [B, Tp, Hkv, dk], vs [B, Tp, Hkv, dv], log_gates [B, Tp, Hkv, m] float32 (`_local_gates`), run [B, Tp].
    Returns local_k [B, nC, Hkv, dk, m] and local_v [B, nC, Hkv, m, dv] in state_dtype."""
    return _chunk_contributions_fwd(ks, vs, log_gates, run, chunk, state_dtype, config, interpret)[0]


def _chunk_contributions_fwd(ks, vs, log_gates, run, chunk, state_dtype, config, interpret):
    grid, rows, run_spec, state = _chunk_contribution_specs(ks, chunk)
    (batch, kv_heads, num_chunks), dk, dv, m = grid, ks.shape[3], vs.shape[3], log_gates.shape[3]
    local = pl.pallas_call(
        _chunk_contribution_kernel,
        grid=grid,
        in_specs=[rows(dk), rows(dv), rows(m), run_spec],
        out_specs=[state(dk, m), state(m, dv)],
        out_shape=[jax.ShapeDtypeStruct((batch, num_chunks, kv_heads, dk, m), state_dtype),
                   jax.ShapeDtypeStruct((batch, num_chunks, kv_heads, m, dv), state_dtype)],
        compiler_params=_compiler_params(config.state_warps, config.state_stages),
        interpret=interpret,
        name="nha_chunk_contributions",
    )(ks, vs, log_gates, run)
    return tuple(local), (ks, vs, log_gates, run)


def _chunk_contributions_bwd(chunk, state_dtype, config, interpret, residuals, cotangents):
    ks, vs, log_gates, run = residuals
    d_local_k, d_local_v = cotangents
    grid, rows, run_spec, state = _chunk_contribution_specs(ks, chunk)
    dk, dv, m = ks.shape[3], vs.shape[3], log_gates.shape[3]
    dks, dvs, dlog_gates = pl.pallas_call(
        _chunk_contribution_backward_kernel,
        grid=grid,
        in_specs=[rows(dk), rows(dv), rows(m), run_spec, state(dk, m), state(m, dv)],
        out_specs=[rows(dk), rows(dv), rows(m)],
        out_shape=[jax.ShapeDtypeStruct(ks.shape, ks.dtype), jax.ShapeDtypeStruct(vs.shape, vs.dtype),
                   jax.ShapeDtypeStruct(log_gates.shape, jnp.float32)],
        compiler_params=_compiler_params(config.state_warps, config.state_stages),
        interpret=interpret,
        name="nha_chunk_contributions_backward",
    )(ks, vs, log_gates, run, d_local_k.astype(state_dtype), d_local_v.astype(state_dtype))
    return dks, dvs, dlog_gates, None


_chunk_contributions.defvjp(_chunk_contributions_fwd, _chunk_contributions_bwd)


def _scanned_chunk_states(ks, vs, log_gates, hk0, hv0, run, *, chunk, state_dtype, config, interpret, written):
    """The slot states entering each chunk: every chunk's own contribution at once (`_chunk_contributions`, or
    batched matmuls over the chunks in XLA without TritonConfig.scan_contribution_kernel), then `_chunk_scan` over
    chunks of H_next = decay * H + local (elementwise: no dots in the dependent chain). The same values as
    `_slot_states`; the contribution kernel and `_chunk_scan` have their own backward (XLA differentiates its
    matmuls).
    The contributions (and their gradients) are stored in state_dtype like the states: in bf16 they move half the
    bytes of float32, which at B = 1, T = 32768, dk = dv = 128 are 537 MB per tensor.

    Shapes as `_slot_states`. written: whether any log gate can be non-zero (`_xla_gates_and_writes`).
    Returns hk [B, nC, Hkv, dk, m], hv [B, nC, Hkv, m, dv] in state_dtype and the final states hk_final
    [B, Hkv, dk, m], hv_final [B, Hkv, m, dv] float32.
    """
    batch, t_pad = ks.shape[:2]
    num_chunks = t_pad // chunk
    per_chunk = lambda x: x.reshape((batch, num_chunks, chunk) + x.shape[2:])
    runs = per_chunk(run)  # [B, nC, C]
    # G at the chunk's last row, as a sum (its gradient a broadcast over the chunk's rows, not a cumsum's).
    last_run, gate_last = runs[:, :, -1], _block_sums(log_gates, chunk)  # [B, nC], [B, nC, Hkv, m]
    # As _handover with base 0: only the last row's run reaches the state leaving the chunk, and the state entering
    # the chunk passes through only if its run is still the last row's.
    if config.scan_contribution_kernel:
        local_k, local_v = _chunk_contributions(ks, vs, log_gates, run, chunk, state_dtype, config, interpret)
    else:
        gates, writes = _xla_gates_and_writes(log_gates, chunk, written)
        gates_c = per_chunk(gates)  # [B, nC, C, Hkv, m]
        to_last = jnp.where((runs == last_run[:, :, None])[..., None, None],
                            jnp.exp(gates_c[:, :, -1:] - gates_c), 0.0)
        weights = (per_chunk(writes) * to_last).astype(ks.dtype)
        einsum = functools.partial(jnp.einsum, precision=_xla_precision(ks.dtype),
                                   preferred_element_type=state_dtype)
        local_k = einsum("bctgd,bctgm->bcgdm", per_chunk(ks), weights)
        local_v = einsum("bctgm,bctgd->bcgmd", weights, per_chunk(vs))
    state_run = jnp.concatenate([jnp.zeros((batch, 1), run.dtype), last_run[:, :-1]], axis=1)
    decay = jnp.where((state_run == last_run)[..., None, None], jnp.exp(gate_last), 0.0)  # [B, nC, Hkv, m]
    hk, hk_final = _chunk_scan(decay, local_k, hk0, 1, state_dtype, config, interpret)
    hv, hv_final = _chunk_scan(decay, local_v, hv0, 0, state_dtype, config, interpret)
    return hk, hv, hk_final, hv_final


def _output_side_grads(q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, out, lse, d_out, *,
                       window, num_slots, scale, chunk, config, interpret, chunk_state_grads=False):
    """The backward kernels both custom_vjps share: the output backward, the window dq (inside it, or
    `_window_dq`) and the window backward.

    Returns d_out in q.dtype; (dq, dqr, dks, dvs, dlog_gates, and a, p or with chunk_state_grads dhk, dhv) as
    `_output_backward` gives them, with dqr [B, Tp, H, dk] in qr.dtype (zeros when W = 0); and the window's dkr
    [B, Tp, N, dk], dv [B, Tp, N, dv] in kr.dtype (N a multiple of Hkv: `_group_sum` finishes them; zeros when
    W = 0).
    """
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    d_out = d_out.astype(q.dtype)
    dq, dks, dvs, dlog_gates, state_k, state_v, dqr = _output_backward(
        q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, d_out, lse, delta, window=window, num_slots=num_slots,
        scale=scale, chunk=chunk, config=config, interpret=interpret, chunk_state_grads=chunk_state_grads)
    if window == 0:
        dqr = jnp.zeros(qr.shape, qr.dtype)
    elif dqr is None:
        dqr = _window_dq(qr, kr, v, d_out, lse, delta, seg, window=window, scale=scale, chunk=chunk, config=config,
                         interpret=interpret)
    output_grads = (dq, dqr, dks, dvs, dlog_gates, state_k, state_v)
    if window > 0:
        dkr, dv = _window_backward(qr, kr, v, d_out, lse, delta, seg, window=window, scale=scale, chunk=chunk,
                                   config=config, interpret=interpret)
    else:
        dkr, dv = jnp.zeros(kr.shape, kr.dtype), jnp.zeros(v.shape, kr.dtype)
    return d_out, output_grads, dkr, dv


def _group_sum(x, kv_heads):
    """Per query head (or per block of a group's query heads) [B, T, N, ...] -> per kv head [B, T, Hkv, ...] in
    float32 (GQA groups are consecutive heads; N a multiple of Hkv; T tokens or chunks)."""
    owners, x = x.shape[2], x.astype(jnp.float32)
    if owners == kv_heads:
        return x
    return x.reshape(x.shape[:2] + (kv_heads, owners // kv_heads) + x.shape[3:]).sum(axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11, 12, 13, 14, 15, 16))
def _core(q, qr, kr, v, ks, vs, log_gates, hk0, hv0, seg, run, window, num_slots, scale, chunk, interpret, config):
    """The core problem prepared by `_prepare`, differentiable in its float inputs, with the sequential slot-state
    kernels (`_slot_states` forward, `_state_backward` for its gradient).

    q, qr [B, Tp, H, dk]; kr, ks [B, Tp, Hkv, dk]; v, vs [B, Tp, Hkv, dv]; log_gates [B, Tp, Hkv, m] float32
    (`_local_gates`); hk0 [B, Hkv, dk, m], hv0 [B, Hkv, m, dv] float32; seg, run [B, Tp] int32. Tp is a multiple of
    `chunk`. config: the tuning.TritonConfig. Returns o [B, Tp, H, dv] (q.dtype), hk_final [B, Hkv, dk, m],
    hv_final [B, Hkv, m, dv] (float32).
    """
    return _core_fwd(q, qr, kr, v, ks, vs, log_gates, hk0, hv0, seg, run, window, num_slots, scale, chunk,
                     interpret, config)[0]


def _core_fwd(q, qr, kr, v, ks, vs, log_gates, hk0, hv0, seg, run, window, num_slots, scale, chunk, interpret,
              config):
    out, lse, hk, hv, hk_final, hv_final = _forward(q, qr, kr, v, ks, vs, log_gates, hk0, hv0, seg, run,
                                                    window=window, num_slots=num_slots, scale=scale, chunk=chunk,
                                                    interpret=interpret, config=config)
    out, lse, hk, hv = name_residuals(out, lse, hk, hv)
    return (out, hk_final, hv_final), (q, qr, kr, v, ks, vs, log_gates, seg, run, out, lse, hk, hv)


def _core_bwd(window, num_slots, scale, chunk, interpret, config, residuals, cotangents):
    q, qr, kr, v, ks, vs, log_gates, seg, run, out, lse, hk, hv = residuals
    d_out, dhk_final, dhv_final = cotangents
    batch, _, heads, _ = q.shape
    kv_heads = ks.shape[2]
    group = heads // kv_heads
    d_out, (dq, dqr, dks, dvs, dlog_gates, a, p), dkr, dv = _output_side_grads(
        q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, out, lse, d_out, window=window,
        num_slots=num_slots, scale=scale, chunk=chunk, config=config, interpret=interpret)

    splits = _state_splits(q.shape[3], v.shape[3], config)
    # Whether the state backward's programs own kv heads (else query heads).
    per_kv_head = _heads_per_state_program(group, batch * kv_heads * splits, config) == group

    def state_owners(x):  # [B, Hkv, ...] -> per owner of the state backward; a kv head's gradient enters once
        x = x.astype(jnp.float32)
        if per_kv_head:
            return x
        spread = jnp.zeros((batch, kv_heads, group) + x.shape[2:], jnp.float32).at[:, :, 0].set(x)
        return spread.reshape((batch, heads) + x.shape[2:])

    dks_state, dvs_state, dlog_gates_state, dhk0, dhv0 = _state_backward(
        q, d_out, a, p, ks, vs, log_gates, run, hk, hv, state_owners(dhk_final), state_owners(dhv_final),
        chunk=chunk, config=config, interpret=interpret)

    def owners_to_kv(x):  # [B, Tp, owners, d] -> [B, Tp, Hkv, d]
        return x if per_kv_head else _group_sum(x, kv_heads)

    def owner_states_to_kv(x):  # [B, owners, ...] -> [B, Hkv, ...]
        return x if per_kv_head else x.reshape((batch, kv_heads, group) + x.shape[2:]).sum(axis=2)

    group_sum = functools.partial(_group_sum, kv_heads=kv_heads)
    return (dq.astype(q.dtype), dqr.astype(qr.dtype), group_sum(dkr).astype(kr.dtype), group_sum(dv).astype(v.dtype),
            (group_sum(dks) + owners_to_kv(dks_state)).astype(ks.dtype),
            (group_sum(dvs) + owners_to_kv(dvs_state)).astype(vs.dtype),
            group_sum(dlog_gates) + owners_to_kv(dlog_gates_state),
            owner_states_to_kv(dhk0), owner_states_to_kv(dhv0), None, None)


_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11, 12, 13, 14, 15, 16))
def _core_given_states(q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, window, num_slots, scale, chunk,
                       interpret, config):
    """The core problem with the states entering each chunk given (by `_scanned_chunk_states`): the output kernel,
    and as its gradient the output and window backward kernels plus the gradient of each chunk's entering state.

    Inputs as `_core` but hk [B, nC, Hkv, dk, m], hv [B, nC, Hkv, m, dv] (any float dtype) for hk0, hv0. Needs one
    sub-block per chunk (the output backward's per-row state factors then refer to the chunk's entering state).
    Returns o [B, Tp, H, dv] in q.dtype.
    """
    return _core_given_states_fwd(q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, window, num_slots, scale,
                                  chunk, interpret, config)[0]


def _core_given_states_fwd(q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, window, num_slots, scale, chunk,
                           interpret, config):
    out, lse = _outputs(q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, window=window, num_slots=num_slots,
                        scale=scale, chunk=chunk, config=config, interpret=interpret)
    out, lse, hk, hv = name_residuals(out, lse, hk, hv)
    return out, (q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, out, lse)


def _core_given_states_bwd(window, num_slots, scale, chunk, interpret, config, residuals, d_out):
    q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, out, lse = residuals
    # The gradient of the state entering a chunk (its rows' q^T a and p^T do) comes from the output backward per
    # program, summed here over the rest of each GQA group.
    d_out, (dq, dqr, dks, dvs, dlog_gates, dhk, dhv), dkr, dv = _output_side_grads(
        q, qr, kr, v, ks, vs, log_gates, hk, hv, seg, run, out, lse, d_out, window=window,
        num_slots=num_slots, scale=scale, chunk=chunk, config=config, interpret=interpret, chunk_state_grads=True)
    group_sum = functools.partial(_group_sum, kv_heads=ks.shape[2])
    state_sum = lambda x: x if x.shape[2] == ks.shape[2] else group_sum(x).astype(x.dtype)
    return (dq.astype(q.dtype), dqr.astype(qr.dtype), group_sum(dkr).astype(kr.dtype), group_sum(dv).astype(v.dtype),
            group_sum(dks).astype(ks.dtype), group_sum(dvs).astype(vs.dtype), group_sum(dlog_gates),
            state_sum(dhk), state_sum(dhv), None, None)


_core_given_states.defvjp(_core_given_states_fwd, _core_given_states_bwd)


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


def _chunk_cumsum(x, chunk):
    """Cumulative sums of float32 x [B, Tp, ...] along T, restarting at every chunk of `chunk` tokens.

    As a float32 matmul with a lower-triangular matrix of ones: XLA:GPU makes it one GEMM, where jnp.cumsum is a
    reduce-window fusion (H100, dk = 128, B = 8, T = 2048: the op's device time 3.467 against 3.500 ms)."""
    chunked = x.reshape((x.shape[0], x.shape[1] // chunk, chunk, -1))
    ones_below = jnp.tril(jnp.ones((chunk, chunk), x.dtype))
    summed = jnp.einsum("ij,bcjn->bcin", ones_below, chunked, precision=jax.lax.Precision.HIGHEST)
    return summed.reshape(x.shape)


def _xla_gates_and_writes(log_gates, chunk, written):
    """`_local_gates` over every chunk at once in XLA, for the scan path's contributions without their kernel:
    log_gates [B, Tp, Hkv, m] float32 -> gates (cumulative sums restarting at every chunk) and write strengths.
    written False (W >= T: no token reaches the slots, every log gate is 0) gives constant zeros: left as a cumsum
    of that constant, XLA:GPU constant-folds it element by element, minutes of compile time per full-window
    layer."""
    if not written:
        zeros = jnp.zeros_like(log_gates)
        return zeros, zeros
    return _chunk_cumsum(log_gates, chunk), -jnp.expm1(log_gates)


def _prepare(q, k, v, log_alpha, segment_ids, positions, slot_k0, slot_v0, *, window, rope_theta, block_size):
    """XLA preparation of the core problem (see the module docstring) in chunks of block_size tokens (a power of two
    >= 16). Returns (core_args, chunk)."""
    batch, seq, heads, dk = q.shape
    kv_heads, dv, m = k.shape[2], v.shape[3], log_alpha.shape[3]
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, seq), jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    dk_pad, dv_pad, m_pad = _pow2_at_least(dk), _pow2_at_least(dv), _pow2_at_least(m)
    chunk = int(block_size)
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
    log_gates = jnp.where(writes_ok[:, :, None, None], la_src, 0.0)
    ks, vs = shift(k_p), shift(v_p)
    run = jnp.maximum(seg, 0)  # dummy tokens (-1) are transparent to the slots: run 0's state passes through

    hk0 = jnp.zeros((batch, kv_heads, dk, m), jnp.float32) if slot_k0 is None else jnp.swapaxes(slot_k0, 2, 3)
    hv0 = jnp.zeros((batch, kv_heads, m, dv), jnp.float32) if slot_v0 is None else slot_v0
    pad_dim = lambda x, size: _pad_axis(x, x.ndim - 1, size)
    q_p, qr, kr, ks = (pad_dim(x, dk_pad) for x in (q_p, qr, kr, ks))
    v_p, vs = pad_dim(v_p, dv_pad), pad_dim(vs, dv_pad)
    log_gates = pad_dim(log_gates, m_pad)
    hk0 = pad_dim(_pad_axis(hk0.astype(jnp.float32), 2, dk_pad), m_pad)
    hv0 = pad_dim(_pad_axis(hv0.astype(jnp.float32), 2, m_pad), dv_pad)

    core_args = (q_p, qr, kr, v_p, ks, vs, log_gates, hk0, hv0, seg, run)
    return core_args, chunk


def table_config(batch: int, kv_heads: int, dk: int, dv: int, m: int):
    """The tuning table's tuning.TritonConfig for a call with these sizes (head and slot dims as padded)."""
    dk_pad, dv_pad, m_pad = _pow2_at_least(dk), _pow2_at_least(dv), _pow2_at_least(m)
    return triton_config(max(dk_pad, dv_pad), state_programs=batch * kv_heads,
                         state_elements=batch * kv_heads * m_pad * (dk_pad + dv_pad))


def nha_attention_triton(q, k, v, log_alpha, segment_ids, positions, slot_k0=None, slot_v0=None, *,
                         window, scale, rope_theta, return_slots=False, interpret=False, block_size=None,
                         config=None):
    """Native Hybrid Attention with the Pallas (Triton lowering) kernels; differentiable (custom_vjp).

    q [B, T, H, dk], k [B, T, Hkv, dk], v [B, T, Hkv, dv] (bf16 or float32); log_alpha [B, T, Hkv, m] float32 (<= 0);
    segment_ids [B, T] int32 non-decreasing run ids (-1 = dummy tokens before run 0), positions [B, T] int32 RoPE
    positions; slot_k0 [B, Hkv, m, dk], slot_v0 [B, Hkv, m, dv] float32 or None (zeros), seen by run 0 only.
    window >= 0 tokens (counting the current one); scale multiplies every logit; rope_theta None turns RoPE off.
    Returns out [B, T, H, dv] in q.dtype, and with return_slots also slot_k [B, Hkv, m, dk] and slot_v
    [B, Hkv, m, dv] (float32), the slot state after token T-1.
    interpret=True runs the kernels in Pallas interpret mode (CPU). block_size (a power of two >= 16) overrides the
    tuning table's chunk (tests use small chunks to cover many chunk boundaries cheaply). config: a
    tuning.TritonConfig replacing the table's row (benchmarks and tests); block_size still overrides its chunk.
    """
    window = int(window)
    _validate(q, k, v, log_alpha, segment_ids, positions, slot_k0, slot_v0, window, rope_theta)
    seq, dv, m, dk = q.shape[1], v.shape[3], log_alpha.shape[3], q.shape[3]
    config = config or table_config(k.shape[0], k.shape[2], dk, dv, m)
    core_args, chunk = _prepare(q, k, v, log_alpha, segment_ids, positions, slot_k0, slot_v0, window=window,
                                rope_theta=rope_theta, block_size=block_size or config.chunk)
    statics = (window, m, float(scale), chunk, bool(interpret), config)
    if config.scan_states and min(config.sub_block, chunk) == chunk:
        q_p, qr, kr, v_p, ks, vs, log_gates, hk0, hv0, seg, run = core_args
        state_dtype = ks.dtype if config.input_dtype_states else jnp.float32
        hk_chunks, hv_chunks, hk, hv = _scanned_chunk_states(ks, vs, log_gates, hk0, hv0, run, chunk=chunk,
                                                             state_dtype=state_dtype, config=config,
                                                             interpret=interpret, written=window < seq)
        out = _core_given_states(q_p, qr, kr, v_p, ks, vs, log_gates, hk_chunks, hv_chunks, seg, run, *statics)
    else:
        out, hk, hv = _core(*core_args, *statics)
    out = out[:, :seq, :, :dv]
    if not return_slots:
        return out
    return out, jnp.swapaxes(hk, 2, 3)[:, :, :m, :dk], hv[:, :, :m, :dv]
