"""The Mosaic TPU kernels (pallas_kernels/tpu.py) in interpret mode against the reference forms of nha_jax.ops.

The kernels take run ids and per-run positions (the dispatch's renumbering); the tests build them with the ops'
own `runs_and_positions` and compare with `nha_attention(impl="naive" | "recurrent")` on the user-level ids.
Chunk 16 keeps the shapes small while still covering several chunks and every window regime.
"""
import functools

import jax
import jax.numpy as jnp
import pytest
# The race detector's verdict is only exposed here (jax 0.10.2).
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from nha_jax.ops import nha_attention
from nha_jax.ops.decode import init_state
from nha_jax.ops.segments import runs_and_positions
from pallas_kernels.tpu import nha_attention_tpu

CHUNK = 16


def _inputs(seed, B, T, H, Hkv, dk, dv, m, dtype):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(keys[0], (B, T, H, dk)).astype(dtype)
    k = jax.random.normal(keys[1], (B, T, Hkv, dk)).astype(dtype)
    v = jax.random.normal(keys[2], (B, T, Hkv, dv)).astype(dtype)
    # Gates spread from ~0 (keep) to ~-1 (forget fast), as logsigmoid(f) / tau gives them.
    log_alpha = jax.nn.log_sigmoid(3.0 * jax.random.normal(keys[3], (B, T, Hkv, m))) / 4.0
    cotangent = jax.random.normal(keys[4], (B, T, H, dv))
    return q, k, v, log_alpha, cotangent


def _segments(B, T, boundaries):
    """User segment ids [B, T]: a new document at each boundary (the same for every row)."""
    t = jnp.arange(T)
    ids = sum((t >= b).astype(jnp.int32) for b in boundaries) if boundaries else jnp.zeros(T, jnp.int32)
    return jnp.broadcast_to(ids * 3 + 7, (B, T))  # arbitrary ids: the kernels must see runs, not these


def _max_rel(x, ref):
    """max |x - ref| / max |ref|; a reference that is exactly zero (e.g. d log_alpha when W >= T) must be matched
    to 1e-6 absolute."""
    return float(jnp.max(jnp.abs(x.astype(jnp.float32) - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-2))


def _rel_l2(x, ref):
    return float(jnp.linalg.norm(x.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))


def _outputs_and_grads(attention, args, cotangents):
    """attention(*args) and the gradients of <outputs, cotangents> w.r.t. every arg, from one forward pass (one jit:
    compiling the whole pass once is cheaper than dispatching it op by op)."""
    @jax.jit
    def run(args, cotangents):
        outputs, pullback = jax.vjp(attention, *args)
        return outputs, pullback(jax.tree.map(lambda c, o: c.astype(o.dtype), cotangents, outputs))

    return run(tuple(args), cotangents)


# (W, T, H, Hkv, segment boundaries): W = 0 (pure GSA), W < chunk, W > chunk (several key blocks), W >= T (causal
# softmax plus sinks); odd T everywhere (a padded last chunk); GQA and documents spread over the cases.
GRID = [
    pytest.param(0, 37, 2, 2, [], id="W0"),
    pytest.param(5, 45, 4, 2, [20, 30], id="W5-gqa-segments"),
    pytest.param(23, 41, 2, 1, [13], id="W23-gqa-segment"),
    pytest.param(64, 33, 2, 2, [], id="W-ge-T"),
]


@pytest.mark.parametrize("window, T, H, Hkv, boundaries", GRID)
def test_forward_and_gradients_match_naive_float32(window, T, H, Hkv, boundaries):
    B, dk, dv, m = 1, 16, 8, 4
    q, k, v, log_alpha, cotangent = _inputs(window, B, T, H, Hkv, dk, dv, m, jnp.float32)
    segment_ids = _segments(B, T, boundaries)
    runs, positions = runs_and_positions(segment_ids, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))

    def kernel(q, k, v, log_alpha):
        return nha_attention_tpu(q, k, v, log_alpha, runs, positions, window=window, scale=None,
                                 rope_theta=10000.0, interpret=True, chunk_size=CHUNK)

    def naive(q, k, v, log_alpha):
        return nha_attention(q, k, v, log_alpha, window=window, segment_ids=segment_ids, impl="naive")

    args = (q, k, v, log_alpha)
    out, got = _outputs_and_grads(kernel, args, cotangent)
    out_want, want = _outputs_and_grads(naive, args, cotangent)
    assert _max_rel(out, out_want) <= 1e-4
    for name, g, r in zip(("dq", "dk", "dv", "dlog_alpha"), got, want):
        assert _max_rel(g, r) <= 1e-4, name


def test_initial_and_final_slots_match_recurrent():
    """Run 0 continues a carried-in slot state; the final slots and all six gradients match the recurrence."""
    B, T, H, Hkv, dk, dv, m, window = 2, 35, 2, 1, 16, 8, 4, 6
    q, k, v, log_alpha, cotangent = _inputs(1, B, T, H, Hkv, dk, dv, m, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    slot_k0 = jax.random.normal(keys[0], (B, Hkv, m, dk))
    slot_v0 = jax.random.normal(keys[1], (B, Hkv, m, dv))
    slot_cotangent = jax.random.normal(keys[2], (B, Hkv, m, dk))
    runs = jnp.zeros((B, T), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def kernel(q, k, v, log_alpha, slot_k0, slot_v0):
        return nha_attention_tpu(q, k, v, log_alpha, runs, positions, slot_k0, slot_v0, window=window, scale=None,
                                 rope_theta=10000.0, return_slots=True, interpret=True, chunk_size=CHUNK)

    def recurrent(q, k, v, log_alpha, slot_k0, slot_v0):
        state = init_state(B, Hkv, m, dk, dv, window)._replace(slot_k=slot_k0, slot_v=slot_v0)
        out, final = nha_attention(q, k, v, log_alpha, window=window, initial_state=state, return_state=True,
                                   impl="recurrent")
        return out, final.slot_k, final.slot_v

    args = (q, k, v, log_alpha, slot_k0, slot_v0)
    cotangents = (cotangent, slot_cotangent, jnp.ones((B, Hkv, m, dv)))
    outputs, got = _outputs_and_grads(kernel, args, cotangents)
    outputs_want, want = _outputs_and_grads(recurrent, args, cotangents)
    for name, x, r in zip(("out", "slot_k", "slot_v"), outputs, outputs_want):
        assert _max_rel(x, r) <= 1e-4, name
    for name, g, r in zip(("dq", "dk", "dv", "dlog_alpha", "dslot_k0", "dslot_v0"), got, want):
        assert _max_rel(g, r) <= 1e-4, name


def test_bfloat16_within_one_percent_of_float32_reference():
    """Also the one case at the production chunk size (chunk_size=None: 64), over two chunks."""
    B, T, H, Hkv, dk, dv, m, window = 1, 101, 2, 1, 32, 32, 8, 20
    q, k, v, log_alpha, cotangent = _inputs(3, B, T, H, Hkv, dk, dv, m, jnp.bfloat16)
    segment_ids = _segments(B, T, [29])
    runs, positions = runs_and_positions(segment_ids, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))

    def kernel(q, k, v, log_alpha):
        return nha_attention_tpu(q, k, v, log_alpha, runs, positions, window=window, scale=None,
                                 rope_theta=10000.0, interpret=True, chunk_size=None)

    def naive(q, k, v, log_alpha):
        return nha_attention(q, k, v, log_alpha, window=window, segment_ids=segment_ids, impl="naive")

    args = (q, k, v, log_alpha)
    cotangent = cotangent.astype(jnp.bfloat16)
    out, got = _outputs_and_grads(kernel, args, cotangent)
    out_want, want = _outputs_and_grads(naive, [x.astype(jnp.float32) for x in args], cotangent)
    assert out.dtype == jnp.bfloat16
    assert _rel_l2(out, out_want) <= 1e-2
    for name, g, r, x in zip(("dq", "dk", "dv", "dlog_alpha"), got, want, args):
        assert g.dtype == x.dtype, name
        assert _rel_l2(g, r) <= 1e-2, name


def test_no_races_under_the_tpu_interpreter(monkeypatch):
    """Two simulated cores split the parallel grid axes; the race detector watches every buffer access of all four
    kernels (forward, slot backward, window dq, window dk/dv)."""
    detectors = []  # the interpreter makes a fresh detector per kernel run: keep every one

    class RecordedDetector(tpu_interpret.RaceDetectionState):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            detectors.append(self)

    monkeypatch.setattr(tpu_interpret, "RaceDetectionState", RecordedDetector)
    B, T, H, Hkv, dk, dv, m, window = 1, 27, 2, 1, 16, 8, 4, 10
    q, k, v, log_alpha, cotangent = _inputs(4, B, T, H, Hkv, dk, dv, m, jnp.float32)
    runs = jnp.zeros((B, T), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)

    def kernel(q, k, v, log_alpha):
        return nha_attention_tpu(q, k, v, log_alpha, runs, positions, window=window, scale=None,
                                 rope_theta=10000.0, interpret=params, chunk_size=CHUNK)

    def naive(q, k, v, log_alpha):
        return nha_attention(q, k, v, log_alpha, window=window, impl="naive")

    args = (q, k, v, log_alpha)
    _, grads = jax.block_until_ready(_outputs_and_grads(kernel, args, cotangent))
    assert len(detectors) >= 4, "the race detector did not watch every kernel"
    assert not any(detector.races_found for detector in detectors)
    _, want = _outputs_and_grads(naive, args, cotangent)
    for g, r in zip(grads, want):
        assert _max_rel(g, r) <= 1e-4


def test_dispatch_carries_state_across_calls_like_chunked():
    """Through nha_attention(impl="pallas_tpu"): the dispatch prepends the carried window and passes the slots;
    two calls with documents crossing the cut match the chunked path, outputs and final state."""
    B, T, H, Hkv, dk, dv, m, window = 2, 30, 2, 1, 16, 8, 4, 6
    q, k, v, log_alpha, _ = _inputs(6, B, 2 * T, H, Hkv, dk, dv, m, jnp.float32)
    t = jnp.arange(2 * T)
    segment_ids = jnp.stack([(t >= 25).astype(jnp.int32), (t >= 40).astype(jnp.int32)])

    @functools.partial(jax.jit, static_argnums=0)
    def two_calls(impl):
        halves = lambda x: (x[:, :T], x[:, T:])
        (q1, q2), (k1, k2), (v1, v2), (a1, a2), (s1, s2) = map(halves, (q, k, v, log_alpha, segment_ids))
        out1, state = nha_attention(q1, k1, v1, a1, window=window, segment_ids=s1, return_state=True, impl=impl)
        out2, state = nha_attention(q2, k2, v2, a2, window=window, segment_ids=s2, initial_state=state,
                                    return_state=True, impl=impl)
        return jnp.concatenate([out1, out2], axis=1), state

    (out, state), (out_want, state_want) = two_calls("pallas_tpu"), two_calls("chunked")
    assert _max_rel(out, out_want) <= 1e-4
    for name in ("slot_k", "slot_v", "ring_k", "ring_v", "ring_log_alpha"):
        assert _max_rel(getattr(state, name), getattr(state_want, name)) <= 1e-4, name
    assert jnp.array_equal(state.ring_pos, state_want.ring_pos)


def test_race_detector_flags_a_racy_kernel():
    """The control for the test above: two parallel programs writing one output block is a race."""
    def write_program_id(x_ref, o_ref):
        o_ref[...] = x_ref[...] + pl.program_id(0).astype(jnp.float32)

    racy = pl.pallas_call(
        write_program_id, grid=(2,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)), out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2))
    jax.block_until_ready(racy(jnp.zeros((16, 128))))
    assert tpu_interpret.races.races_found


def test_pure_sliding_window_without_slots():
    """m = 0 leaves a plain sliding-window softmax (no sinks)."""
    B, T, H, Hkv, dk, dv, window = 1, 20, 2, 2, 16, 8, 4
    q, k, v, _, _ = _inputs(5, B, T, H, Hkv, dk, dv, 1, jnp.float32)
    log_alpha = jnp.zeros((B, T, Hkv, 0))
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out, slot_k, slot_v = nha_attention_tpu(
        q, k, v, log_alpha, jnp.zeros((B, T), jnp.int32), positions, window=window, scale=None, rope_theta=None,
        return_slots=True, interpret=True, chunk_size=CHUNK)
    t = jnp.arange(T)
    visible = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    logits = jnp.einsum("bthd,bjhd->bhtj", q, k) * dk ** -0.5
    want = jnp.einsum("bhtj,bjhe->bthe", jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1), v)
    assert _max_rel(out, want) <= 1e-4
    assert slot_k.shape == (B, Hkv, 0, dk) and slot_v.shape == (B, Hkv, 0, dv)


@pytest.mark.parametrize("change, message", [
    (dict(window=-1), "window"),
    (dict(chunk_size=24), "chunk_size"),
    (dict(k_heads=3), "multiple of the kv heads"),
])
def test_bad_arguments_name_the_fix(change, message):
    B, T, H, dk = 1, 8, 4, 8
    Hkv = change.get("k_heads", 2)
    q = jnp.zeros((B, T, H, dk))
    k = v = jnp.zeros((B, T, Hkv, dk))
    log_alpha = jnp.zeros((B, T, Hkv, 2))
    ids = jnp.zeros((B, T), jnp.int32)
    with pytest.raises(ValueError, match=message):
        nha_attention_tpu(q, k, v, log_alpha, ids, ids, window=change.get("window", 2), scale=None,
                          rope_theta=None, interpret=True, chunk_size=change.get("chunk_size"))


def test_remat_policy_dots_and_attention_keeps_the_forward_kernel_from_running_again():
    from nha_jax.model import REMAT_POLICIES
    from nha_testing import live_kernel_calls
    q, k, v, log_alpha, ct = _inputs(0, 1, 40, 2, 1, 128, 128, 16, jnp.float32)

    def block(q, k, v, log_alpha):  # an attention op between two matmuls, as in the model
        out = nha_attention(q @ jnp.eye(128), k, v, log_alpha, window=4, impl="pallas_tpu", chunk_size=CHUNK)
        return jnp.sin(out) @ jnp.eye(128)

    def live_forward_kernels(policy):
        loss = lambda *args: jnp.sum(jax.checkpoint(block, policy=REMAT_POLICIES[policy])(*args) * ct)
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, log_alpha).jaxpr
        return live_kernel_calls(jaxpr, "nha_tpu_forward")

    assert live_forward_kernels("dots_with_no_batch_dims_saveable") == 2  # forward, and again in the backward
    assert live_forward_kernels("dots_and_attention") == 1
