"""The GPU Pallas (Triton lowering) NHA kernels, forward and backward, run in interpret mode on the CPU, against
nha_jax.ops references.

Small shapes with block_size=16 or 32 so that a few dozen tokens cross several chunk and sub-block boundaries.
Everything is jitted: interpret mode executed op by op costs several times its compile.
"""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from nha_jax.ops import nha_attention
from nha_jax.ops.decode import init_state
from nha_jax.ops.reference import nha_recurrent
from nha_jax.ops.segments import runs_and_positions
from nha_testing import live_kernel_calls, max_rel_err
from pallas_kernels import triton
from pallas_kernels.triton import (_FACTORED_SPAN, _chunk_scan, _prepare, _stacked_heads, _strong_chunks,
                                   nha_attention_triton)
from pallas_kernels.tuning import triton_config

ROPE = 10000.0


def _inputs(seed, batch, seq, heads, kv_heads, dk, dv, m, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(keys[0], (batch, seq, heads, dk), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, dk), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, dv), dtype)
    # Gates from strong (log alpha ~ -1) to weak (~ -0.01): exercises the exp(G_t - G_p) bounds.
    log_alpha = jax.nn.log_sigmoid(3.0 * jax.random.normal(keys[3], (batch, seq, kv_heads, m))) / 4
    cotangent = jax.random.normal(keys[4], (batch, seq, heads, dv), jnp.float32)
    return q, k, v, log_alpha, cotangent


def _segments(batch, seq, cuts):
    """User segment ids [B, T]: a new document after every position in `cuts` (same for every batch row)."""
    ids = jnp.zeros((seq,), jnp.int32)
    for cut in cuts:
        ids = ids + (jnp.arange(seq) >= cut)
    return jnp.broadcast_to(ids * 7, (batch, seq))  # not 0, 1, 2: the kernels must not assume consecutive ids


def _triton(q, k, v, log_alpha, seg, *, window, block_size, **kwargs):
    """The kernel entry point called as the dispatch does for a fresh (non-continuing) call."""
    batch = q.shape[0]
    runs, positions = runs_and_positions(seg, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
    return nha_attention_triton(q, k, v, log_alpha, runs, positions, window=window, scale=q.shape[-1] ** -0.5,
                                rope_theta=ROPE, interpret=True, block_size=block_size, **kwargs)


def _rel_l2(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# (batch, seq, heads, kv_heads, dk, dv, m, window, cuts, block_size, gate_boost)
CASES = {
    # block 32 = two sub-blocks of 16: the state is carried inside a chunk.
    # Gates 20x stronger from T/2: sub-blocks on both sides of _FACTORED_SPAN (checked in the test).
    "w_lt_subblock_gqa_segments_odd_t_dk_ne_dv_strong_gates": (2, 37, 4, 2, 32, 16, 8, 5, (11, 30), 32, 20.0),
    # Documents long against W and the chunk: slot states (and their gradients, summed over the GQA group of 2)
    # cross several chunks.
    "gqa_state_crosses_chunks": (1, 50, 4, 2, 16, 16, 8, 3, (23,), 16, 1.0),
    # A GQA group of 3 (not a power of two): the state backward runs per query head, XLA sums the group. dk = dv
    # = 32: the sequential state-gradient kernel splits dk and dv in two (the test's state_splits).
    "w_gt_chunk_segments_group3": (1, 45, 3, 1, 32, 32, 16, 24, (20,), 16, 1.0),
    # A GQA group of 4: the output backward takes its stacked heads in two passes (backward_head_passes).
    "gqa4_head_passes": (1, 40, 8, 2, 16, 16, 8, 5, (17,), 16, 1.0),
    "w_ge_t_full_attention_plus_sinks": (1, 40, 2, 2, 16, 16, 16, 64, (), 16, 1.0),
    "no_slots": (1, 33, 2, 1, 16, 16, 0, 9, (17,), 16, 1.0),
}


def _subblock_spans(q, k, v, log_alpha, runs, positions, window, block_size, sub=16):
    """The span of each (batch, sub-block of `sub` rows, kv head), max over slots of -G_last (the decay across the
    sub-block), from the kernels' own log gates, and those log gates [B, Tp, Hkv, m]."""
    core_args, _ = _prepare(q, k, v, log_alpha, runs, positions, None, None, window=window, rope_theta=ROPE,
                            block_size=block_size)
    log_gates = core_args[6]
    batch, t_pad, kv_heads, m = log_gates.shape
    last = jnp.cumsum(log_gates.reshape(batch, t_pad // sub, sub, kv_heads, m), axis=2)[:, :, -1]
    return jnp.max(-last, axis=-1), log_gates


@pytest.mark.parametrize("states", ["sequential", "scan"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_gradients_match_naive(case, states):
    """Output and the gradients of q, k, v, log_alpha (max relative error <= 1e-4 in float32), through both pair
    paths of the kernels (factored matmuls and the elementwise fallback for strong gates), with the slot states
    from the sequential kernels or from the chunk scan (one sub-block per chunk). The sequential state backward
    takes a whole GQA group per program wherever the group is a power of two (on the GPU only when there are
    enough programs), and so do the output and window kernels (their rows stacked): the group-of-3 case covers one
    program per query head."""
    batch, seq, heads, kv_heads, dk, dv, m, window, cuts, block_size, gate_boost = case
    config = dataclasses.replace(triton_config(max(dk, dv, 16)), grouped_state_backward_programs=0,
                                 scan_states=states == "scan", stacked_rows=64, state_splits=2,
                                 separate_window_dq=False, backward_head_passes=2)
    group = heads // kv_heads
    assert _stacked_heads(group, 16, config.stacked_rows) == (group if group & (group - 1) == 0 else 1)
    if states == "scan":  # also the window dq in its own kernel and the stacked heads in passes of one head
        config = dataclasses.replace(config, sub_block=block_size, separate_window_dq=True, window_stages=1,
                                     backward_head_passes=4)
    _check_against_naive(case, config)


def _check_against_naive(case, config):
    """Output and gradients of the kernels under `config` against impl="naive" (max relative error <= 1e-4)."""
    batch, seq, heads, kv_heads, dk, dv, m, window, cuts, block_size, gate_boost = case
    q, k, v, log_alpha, cotangent = _inputs(2, batch, seq, heads, kv_heads, dk, dv, m)
    log_alpha = log_alpha * jnp.where(jnp.arange(seq) >= seq // 2, gate_boost, 1.0)[None, :, None, None]
    seg = _segments(batch, seq, cuts)
    if gate_boost > 1:
        runs, positions = runs_and_positions(seg, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
        spans, _ = _subblock_spans(q, k, v, log_alpha, runs, positions, window, block_size)
        assert float(spans.max()) > _FACTORED_SPAN > float(spans.max(axis=(0, 2))[2]) > 0.5 * _FACTORED_SPAN
        # Both passes of the output kernels have work: chunks in the factored form and chunks redone elementwise.
        sub = min(config.sub_block, block_size)
        spans, log_gates = _subblock_spans(q, k, v, log_alpha, runs, positions, window, block_size, sub)
        strong = _strong_chunks(log_gates, block_size, sub)
        assert 0 < int(strong.sum()) < strong.size
        per_chunk = spans.reshape(batch, -1, block_size // sub, kv_heads).max(axis=2)
        assert jnp.array_equal(strong, (per_chunk > _FACTORED_SPAN).astype(jnp.int32))

    def loss_triton(*xs):
        out = _triton(*xs, seg, window=window, block_size=block_size, config=config)
        return jnp.sum(out * cotangent), out

    def loss_naive(*xs):
        out = nha_attention(*xs, window=window, rope_theta=ROPE, segment_ids=seg, impl="naive")
        return jnp.sum(out * cotangent), out

    grads, out = _grad(loss_triton)(q, k, v, log_alpha)
    refs, ref = _grad(loss_naive)(q, k, v, log_alpha)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert max_rel_err(out, ref) <= 1e-4
    for name, g, r in zip(("dq", "dk", "dv", "dlog_alpha"), grads, refs):
        assert g.shape == r.shape, name
        if r.size:  # m = 0 has no log_alpha
            assert max_rel_err(g, r) <= 1e-4, name


def _grad(loss, argnums=(0, 1, 2, 3)):
    return jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))


@pytest.mark.parametrize("decay_axis", [1, 0], ids=["keys", "values"])
def test_chunk_scan_matches_a_python_loop(decay_axis):
    """The elementwise chunk scan of the scan path and its custom_vjp against a loop of H_{c+1} = decay_c H_c + L_c:
    5 chunks (odd: one chunk per loop step), a state of [32, 16] in [16, 16] tiles (so the decay gradient is
    summed over two tiles' partial sums), float32 to 1e-5."""
    batch, chunks, kv_heads, width, m = 2, 5, 3, 32, 16
    shape = (batch, chunks, kv_heads) + ((width, m) if decay_axis == 1 else (m, width))
    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    decay = jax.random.uniform(keys[0], (batch, chunks, kv_heads, m))
    local = jax.random.normal(keys[1], shape)
    init = jax.random.normal(keys[2], (batch, kv_heads) + shape[3:])
    cotangent = jax.random.normal(keys[3], shape)
    config = dataclasses.replace(triton_config(16), scan_tile=(16, 16), scan_unroll=4)

    def loop(decay, local, init):
        state, entering = init, []
        for c in range(chunks):
            entering.append(state)
            state = jnp.expand_dims(decay[:, c], 3 - decay_axis) * state + local[:, c]
        return jnp.stack(entering, axis=1), state

    def kernel(decay, local, init):
        return _chunk_scan(decay, local, init, decay_axis, jnp.float32, config, True)

    def loss(scan, *args):
        entering, final = scan(*args)
        return jnp.sum(entering * cotangent) + jnp.sum(final ** 2), (entering, final)

    grads, outs = jax.grad(loss, argnums=(1, 2, 3), has_aux=True)(kernel, decay, local, init)
    ref_grads, ref_outs = jax.grad(loss, argnums=(1, 2, 3), has_aux=True)(loop, decay, local, init)
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        assert max_rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("scan_states", [False, True], ids=["sequential", "scan"])
def test_initial_and_final_slots_match_recurrent(scan_states):
    """slot_k0/slot_v0 seen by run 0 only; return_slots = the state after T-1; gradients reach the initial slots.
    Also the W = 0 case of the grid (Gated Slot Attention), with GQA, segments and odd T; with the slot states
    from the sequential kernels or the chunk scan (its contributions from XLA)."""
    batch, seq, heads, kv_heads, dk, dv, m, window = 2, 35, 2, 1, 16, 16, 16, 0
    q, k, v, log_alpha, cotangent = _inputs(3, batch, seq, heads, kv_heads, dk, dv, m)
    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    slot_k0 = jax.random.normal(keys[0], (batch, kv_heads, m, dk))
    slot_v0 = jax.random.normal(keys[1], (batch, kv_heads, m, dv))
    # Row 0: one document continuing the state. Row 1: the state's document, then a new one.
    seg = jnp.stack([jnp.zeros((seq,), jnp.int32), (jnp.arange(seq) >= 20).astype(jnp.int32)])
    runs, positions = runs_and_positions(seg, jnp.ones((batch,), bool), jnp.zeros((batch,), jnp.int32))

    def triton(q, k, v, log_alpha, slot_k0, slot_v0):
        return nha_attention_triton(q, k, v, log_alpha, runs, positions, slot_k0, slot_v0, window=window,
                                    scale=dk ** -0.5, rope_theta=ROPE, return_slots=True, interpret=True,
                                    block_size=16, config=config)

    # The scan path here takes the chunks' contributions from XLA's matmuls (the dk = 128 row's way); the grid of
    # test_forward_and_gradients_match_naive covers their Pallas kernel.
    config = dataclasses.replace(triton_config(dk), scan_states=scan_states, scan_contribution_kernel=False)

    def recurrent(q, k, v, log_alpha, slot_k0, slot_v0):
        state = init_state(batch, kv_heads, m, dk, dv, window)._replace(slot_k=slot_k0, slot_v=slot_v0,
                                                                        segment=seg[:, 0])
        out, final = nha_recurrent(q, k, v, log_alpha, window=window, scale=dk ** -0.5, rope_theta=ROPE,
                                   segment_ids=seg, initial_state=state)
        return out, final.slot_k, final.slot_v

    args = (q, k, v, log_alpha, slot_k0, slot_v0)

    def loss(fn):
        def scalar(*xs):
            out, slot_k, slot_v = fn(*xs)
            scalar = jnp.sum(out * cotangent) + jnp.sum(slot_k * slot_k0) + jnp.sum(jnp.sin(slot_v))
            return scalar, (out, slot_k, slot_v)
        return scalar

    grads, values = _grad(loss(triton), argnums=tuple(range(6)))(*args)
    refs, ref_values = _grad(loss(recurrent), argnums=tuple(range(6)))(*args)
    for name, got, want in zip(("out", "slot_k", "slot_v"), values, ref_values):
        assert max_rel_err(got, want) <= 1e-4, name
    for name, g, r in zip(("dq", "dk", "dv", "dlog_alpha", "dslot_k0", "dslot_v0"), grads, refs):
        assert max_rel_err(g, r) <= 1e-4, name


def test_dummy_tokens_pass_the_initial_state_to_run_0():
    """Run id -1 marks dummy tokens before run 0: no window and no slot write, and run 0 still sees slot_k0."""
    batch, seq, dummies, heads, kv_heads, dk, dv, m, window = 1, 30, 5, 2, 2, 16, 16, 16, 4
    q, k, v, log_alpha, _ = _inputs(5, batch, seq, heads, kv_heads, dk, dv, m)
    keys = jax.random.split(jax.random.PRNGKey(6), 2)
    slot_k0 = jax.random.normal(keys[0], (batch, kv_heads, m, dk))
    slot_v0 = jax.random.normal(keys[1], (batch, kv_heads, m, dv))
    runs = jnp.where(jnp.arange(seq) < dummies, -1, 0)[None].astype(jnp.int32)
    positions = jnp.maximum(jnp.arange(seq) - dummies, 0)[None].astype(jnp.int32)
    triton = jax.jit(lambda *xs: nha_attention_triton(*xs, runs, positions, slot_k0, slot_v0, window=window,
                                                      scale=dk ** -0.5, rope_theta=ROPE, return_slots=True,
                                                      interpret=True, block_size=16))
    out, slot_k, slot_v = triton(q, k, v, log_alpha)
    state = init_state(batch, kv_heads, m, dk, dv, window)._replace(slot_k=slot_k0, slot_v=slot_v0,
                                                                    segment=jnp.zeros((batch,), jnp.int32))
    tail = lambda x: x[:, dummies:]
    ref, final = nha_recurrent(tail(q), tail(k), tail(v), tail(log_alpha), window=window, scale=dk ** -0.5,
                               rope_theta=ROPE, initial_state=state)
    assert max_rel_err(tail(out), ref) <= 1e-4
    assert max_rel_err(slot_k, final.slot_k) <= 1e-4 and max_rel_err(slot_v, final.slot_v) <= 1e-4


def test_bfloat16_forward_and_gradients():
    batch, seq, heads, kv_heads, dk, dv, m, window = 1, 48, 4, 2, 32, 32, 16, 20
    q, k, v, log_alpha, cotangent = _inputs(7, batch, seq, heads, kv_heads, dk, dv, m, jnp.bfloat16)
    seg = _segments(batch, seq, (29,))

    def loss_triton(*xs):
        out = _triton(*xs, seg, window=window, block_size=16)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    def loss_naive(q, k, v, log_alpha):
        up = lambda x: x.astype(jnp.float32)
        out = nha_attention(up(q), up(k), up(v), log_alpha, window=window, rope_theta=ROPE, segment_ids=seg,
                            impl="naive")
        return jnp.sum(out * cotangent), out

    grads, out = _grad(loss_triton)(q, k, v, log_alpha)
    refs, ref = _grad(loss_naive)(q, k, v, log_alpha)
    assert out.dtype == jnp.bfloat16
    assert _rel_l2(out, ref) <= 1e-2
    for name, g, r in zip(("dq", "dk", "dv", "dlog_alpha"), grads, refs):
        assert _rel_l2(g, r) <= 1e-2, name


@pytest.mark.parametrize("change, match", [
    (dict(k_heads=3), "multiple of kv heads"),
    (dict(window=-1), "window"),
    (dict(block_size=24), "block_size"),
])
def test_bad_input_raises_value_error(change, match):
    q, k, v, log_alpha, _ = _inputs(8, 1, 8, 4, change.get("k_heads", 2), 16, 16, 4)
    seg = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=match):
        _triton(q, k, v, log_alpha, seg, window=change.get("window", 2), block_size=change.get("block_size", 16))


@pytest.mark.parametrize("impl", ["pallas_triton", "chunked"])
def test_full_window_gates_are_not_a_cumsum_of_constants(impl, monkeypatch):
    """With W >= T no token reaches the slots, so every gate is a constant 0. A cumulative sum over such a constant
    is folded by XLA:GPU element by element at compile time (minutes per layer at training shapes): the Triton
    path, whose only gate cumsum in XLA is that of the scan path's contributions without their kernel (the kernels
    take theirs in-kernel), must pass the gates as zeros; the chunked path must hide them behind an optimisation
    barrier."""
    q, k, v, log_alpha, _ = _inputs(0, 1, 24, 2, 1, 8, 8, 4)
    config = dataclasses.replace(triton_config(16), scan_states=True, scan_contribution_kernel=False)

    def jaxpr(window):
        if impl == "pallas_triton":
            loss = lambda *args: _triton(*args, jnp.zeros((1, 24), jnp.int32), window=window, block_size=16,
                                         config=config).sum()
        else:
            loss = lambda *args: nha_attention(*args, window=window, impl=impl, chunk_size=8).sum()
        return str(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, log_alpha))

    if impl == "pallas_triton":
        cumsums = []
        chunk_cumsum = triton._chunk_cumsum
        monkeypatch.setattr(triton, "_chunk_cumsum", lambda x, chunk: cumsums.append(x.shape) or chunk_cumsum(x, chunk))
        jaxpr(8)
        assert cumsums, "W < T: the gates are a chunk-local cumsum"
        cumsums.clear()
        jaxpr(24)
        assert not cumsums
    else:  # the chunked path's gates are constant only when W > T (at W = T they still depend on the run ids)
        assert "optimization_barrier" not in jaxpr(24) and "optimization_barrier" in jaxpr(40)


@pytest.mark.parametrize("scan_states", [False, True], ids=["sequential", "scan"])
def test_remat_policy_dots_and_attention_keeps_the_forward_kernels_from_running_again(scan_states):
    from nha_jax.model import REMAT_POLICIES
    q, k, v, log_alpha, ct = _inputs(0, 1, 40, 2, 1, 16, 16, 16)
    seg = jnp.zeros((1, 40), jnp.int32)
    config = dataclasses.replace(triton_config(16), chunk=16, sub_block=16, scan_states=scan_states)

    def block(q, k, v, log_alpha):  # an attention op between two matmuls, as in the model
        out = _triton(q @ jnp.eye(16), k, v, log_alpha, seg, window=4, block_size=16, config=config)
        return jnp.sin(out) @ jnp.eye(16)

    def live_output_kernels(policy):
        # The output kernel's second pass (strong-gate chunks, in place over the first): the one whose outputs the
        # rest of the step reads, so a forward that runs for nothing leaves it dead.
        loss = lambda *args: jnp.sum(jax.checkpoint(block, policy=REMAT_POLICIES[policy])(*args) * ct)
        return live_kernel_calls(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, log_alpha).jaxpr,
                                 "nha_output_strong_gates")

    assert live_output_kernels("dots_with_no_batch_dims_saveable") == 2  # forward, and again in the backward
    assert live_output_kernels("dots_and_attention") == 1
    assert live_output_kernels("full") == 2
