"""The NHA operator: reference forms agree, identities hold, gradients, segments, states, decoding, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nha_jax.ops import decode_step, init_state, prefill
from nha_jax.ops import nha_attention as eager_nha_attention
from nha_testing import jitted_nha, max_rel_err, random_inputs, random_segments, rel_l2

nha_attention = jitted_nha()

B, HKV, DK, DV = 2, 2, 8, 6  # dk != dv everywhere


def _grid():
    """Covers every value of every factor of the issue's grid, each T with two windows and each window with two
    sequence lengths, in 12 cases (the full product would take CI an hour)."""
    Ts, Ws = (1, 7, 63, 64, 65, 257), (0, 1, 5, 64, 100, "T")
    ms, Gs, chunks = (0, 1, 16, 64), (1, 4), (16, 64)
    cases = []
    pairs = [(T, W) for i, T in enumerate(Ts) for j, W in enumerate(Ws) if (i + j) % 3 == 0]
    for n, (T, W) in enumerate(pairs):
        W = T + 3 if W == "T" else W
        m = ms[n % 4] or (0 if W else 16)
        cases.append((T, W, m, Gs[n % 2], (n // 2) % 2 == 0, (n // 4) % 2 == 0, chunks[(n // 3) % 2]))
    return cases


@pytest.mark.parametrize("T,W,m,G,rope,segments,chunk", _grid())
def test_recurrent_naive_chunked_agree(T, W, m, G, rope, segments, chunk):
    q, k, v, la = random_inputs(T * 7 + W, B, T, HKV * G, HKV, DK, DV, m)
    kw = dict(window=W, rope_theta=10000.0 if rope else None,
              segment_ids=random_segments(T, B, T) if segments else None)
    naive = nha_attention(q, k, v, la, impl="naive", **kw)
    assert naive.shape == (B, T, HKV * G, DV)
    assert max_rel_err(nha_attention(q, k, v, la, impl="recurrent", **kw), naive) <= 1e-5
    assert max_rel_err(nha_attention(q, k, v, la, impl="chunked", chunk_size=chunk, **kw), naive) <= 1e-5


@pytest.mark.parametrize("T,W,m,G", [(65, 5, 16, 4), (100, 0, 64, 1), (64, 200, 16, 2), (129, 40, 0, 2)])
def test_bf16_inputs(T, W, m, G):
    q, k, v, la = random_inputs(1, B, T, HKV * G, HKV, DK, DV, m, dtype=jnp.bfloat16)
    seg = random_segments(2, B, T)
    out = nha_attention(q, k, v, la, window=W, segment_ids=seg, impl="chunked", chunk_size=32)
    assert out.dtype == jnp.bfloat16
    f32 = lambda x: x.astype(jnp.float32)
    ref = nha_attention(f32(q), f32(k), f32(v), la, window=W, segment_ids=seg, impl="naive")
    assert rel_l2(out, ref) <= 1e-2


def test_strong_gates_stay_finite_and_exact():
    """Gates of e^-40 per step: chunk-local cumulative gates reach -2500, yet no exponent is ever positive."""
    q, k, v, _ = random_inputs(3, B, 150, 4, HKV, DK, DV, 8)
    la = -40.0 * jax.random.uniform(jax.random.PRNGKey(4), (B, 150, HKV, 8))
    ref = nha_attention(q, k, v, la, window=3, impl="recurrent")
    out = nha_attention(q, k, v, la, window=3, impl="chunked", chunk_size=64)
    assert np.isfinite(np.asarray(out)).all()
    assert max_rel_err(out, ref) <= 1e-5


def test_window_zero_is_gated_slot_attention():
    """W = 0: GSA's recurrence, written out independently here in numpy."""
    T, m = 37, 5
    q, k, v, la = (np.asarray(x, np.float64) for x in random_inputs(5, 1, T, 1, 1, DK, DV, m))
    Ks, Vs, outs = np.zeros((m, DK)), np.zeros((m, DV)), []
    for t in range(T):
        alpha = np.exp(la[0, t, 0])[:, None]
        Ks, Vs = alpha * Ks + (1 - alpha) * k[0, t, 0], alpha * Vs + (1 - alpha) * v[0, t, 0]
        logits = Ks @ q[0, t, 0] / np.sqrt(DK)
        p = np.exp(logits - logits.max())
        outs.append((p / p.sum()) @ Vs)
    out = nha_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, la)), window=0, impl="chunked", chunk_size=8)
    assert max_rel_err(out[0, :, 0], np.stack(outs)) <= 1e-5


def test_full_window_is_causal_attention_with_sinks():
    """W >= T: o_t = sum_j e^{b_j} v_j / (m + sum_j e^{b_j}), b = RoPE'd causal logits."""
    T, m, theta = 29, 7, 500.0
    q, k, v, la = random_inputs(6, 1, T, 2, 1, DK, DV, m)
    half = DK // 2
    freq = theta ** (-np.arange(half) / half)
    def rope(x):
        x = np.asarray(x, np.float64)
        ang = np.arange(T)[:, None] * freq
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
    expected = np.zeros((T, 2, DV))
    for h in range(2):
        b = rope(q[0, :, h]) @ rope(k[0, :, 0]).T / np.sqrt(DK)
        e = np.where(np.tril(np.ones((T, T))), np.exp(b), 0.0)
        expected[:, h] = e @ np.asarray(v[0, :, 0], np.float64) / (m + e.sum(-1, keepdims=True))
    for impl in ("chunked", "recurrent"):
        out = nha_attention(q, k, v, la, window=T, rope_theta=theta, impl=impl, chunk_size=8)
        assert max_rel_err(out[0], expected) <= 1e-5, impl


@pytest.mark.parametrize("T,W,m,G,segments", [(37, 5, 16, 2, True), (40, 0, 8, 1, False), (33, 50, 4, 4, True),
                                               (45, 17, 0, 2, True)])
def test_chunked_gradients_match_naive(T, W, m, G, segments):
    q, k, v, la = random_inputs(T, B, T, HKV * G, HKV, DK, DV, m)
    seg = random_segments(T, B, T) if segments else None
    weights = jax.random.normal(jax.random.PRNGKey(9), (B, T, HKV * G, DV))
    def loss(impl):
        return lambda *x: jnp.sum(weights * nha_attention(*x, window=W, segment_ids=seg, impl=impl, chunk_size=16))
    g_ref = jax.grad(loss("naive"), argnums=(0, 1, 2, 3))(q, k, v, la)
    g_out = jax.jit(jax.grad(loss("chunked"), argnums=(0, 1, 2, 3)))(q, k, v, la)
    for name, a, b in zip(("dq", "dk", "dv", "dlog_alpha"), g_out, g_ref):
        if b.size:
            assert max_rel_err(a, b) <= 1e-5, name


def test_segments_do_not_leak():
    T = 70
    q, k, v, la = random_inputs(11, 1, T, 4, HKV, DK, DV, 16)
    seg = jnp.asarray([[1] * 30 + [2] * 40])
    noise = random_inputs(12, 1, T, 4, HKV, DK, DV, 16)
    first = (jnp.arange(T) < 30)[None, :, None, None]
    mixed = [jnp.where(first, n, x) for n, x in zip(noise, (q, k, v, la))]
    for impl in ("chunked", "recurrent", "naive"):
        a = nha_attention(q, k, v, la, window=8, segment_ids=seg, impl=impl, chunk_size=16)
        b = nha_attention(*mixed, window=8, segment_ids=seg, impl=impl, chunk_size=16)
        assert not np.allclose(a[:, :30], b[:, :30])
        np.testing.assert_array_equal(np.asarray(a[:, 30:]), np.asarray(b[:, 30:]), err_msg=impl)


@pytest.mark.parametrize("W,m,split,first_impl,second_impl", [
    (5, 8, 23, "chunked", "chunked"), (0, 8, 30, "chunked", "chunked"), (40, 4, 17, "chunked", "chunked"),
    (3, 0, 31, "chunked", "chunked"), (6, 8, 30, "chunked", "chunked"),
    (5, 8, 23, "recurrent", "chunked"), (6, 8, 30, "chunked", "recurrent")])
def test_state_chaining_is_exact(W, m, split, first_impl, second_impl):
    """[0, T1) then [T1, T) with the carried state equals [0, T) — with segments, one boundary exactly at T1=30."""
    T = 61
    q, k, v, la = random_inputs(W + m + split, B, T, 4, HKV, DK, DV, m)
    seg = jnp.asarray(np.stack([[1] * 12 + [2] * 18 + [3] * 31, [5] * T]))
    whole = nha_attention(q, k, v, la, window=W, segment_ids=seg, impl="naive")
    cut = lambda x, s: x[:, s]
    out1, state = nha_attention(*(cut(x, slice(0, split)) for x in (q, k, v, la)), window=W,
                                segment_ids=seg[:, :split], return_state=True, impl=first_impl, chunk_size=8)
    out2, _ = nha_attention(*(cut(x, slice(split, T)) for x in (q, k, v, la)), window=W,
                            segment_ids=seg[:, split:], initial_state=state, return_state=True, impl=second_impl,
                            chunk_size=8)
    assert max_rel_err(jnp.concatenate([out1, out2], axis=1), whole) <= 1e-5


def test_states_of_chunked_and_recurrent_agree():
    T, W, m = 45, 7, 8
    q, k, v, la = random_inputs(21, B, T, 4, HKV, DK, DV, m)
    seg = random_segments(3, B, T)
    _, s_rec = nha_attention(q, k, v, la, window=W, segment_ids=seg, return_state=True, impl="recurrent")
    _, s_chk = nha_attention(q, k, v, la, window=W, segment_ids=seg, return_state=True, impl="chunked", chunk_size=16)
    assert max_rel_err(s_chk.slot_k, s_rec.slot_k) <= 1e-5 and max_rel_err(s_chk.slot_v, s_rec.slot_v) <= 1e-5
    np.testing.assert_array_equal(s_chk.ring_pos, s_rec.ring_pos)
    valid = (s_rec.ring_pos >= 0)[..., None, None]
    np.testing.assert_allclose(np.where(valid, s_chk.ring_k, 0), np.where(valid, s_rec.ring_k, 0))
    np.testing.assert_array_equal(s_chk.segment, s_rec.segment)
    np.testing.assert_array_equal(s_chk.position, s_rec.position)


@pytest.mark.parametrize("W,m,T0", [(6, 8, 20), (0, 8, 13), (32, 4, 9), (4, 0, 17)])
def test_prefill_then_decode_equals_one_forward(W, m, T0):
    n = 12
    q, k, v, la = random_inputs(31 + W, B, T0 + n, 4, HKV, DK, DV, m)
    whole = nha_attention(q, k, v, la, window=W, impl="naive")
    out, state = jax.jit(prefill, static_argnames=("window", "chunk_size"))(q[:, :T0], k[:, :T0], v[:, :T0], la[:, :T0], window=W, chunk_size=8)
    assert max_rel_err(out, whole[:, :T0]) <= 1e-5
    step = jax.jit(decode_step)
    shapes = jax.tree_util.tree_map(jnp.shape, state)
    for t in range(T0, T0 + n):
        o, state = step(state, q[:, t], k[:, t], v[:, t], la[:, t])
        assert max_rel_err(o, whole[:, t]) <= 1e-5, t
        assert jax.tree_util.tree_map(jnp.shape, state) == shapes  # constant-size cache


def test_decode_cache_size_is_independent_of_context():
    sizes = []
    for T in (16, 64):
        q, k, v, la = random_inputs(0, 1, T, 4, HKV, DK, DV, 8)
        _, state = prefill(q, k, v, la, window=5, chunk_size=16)
        sizes.append(sum(x.size for x in jax.tree_util.tree_leaves(state)))
    assert sizes[0] == sizes[1]
    assert sizes[0] == HKV * ((8 + 5) * (DK + DV) + 5 * 8) + 5 + 2  # NHA_SPEC §4, plus positions and segment


def test_chunked_backward_memory_is_linear_in_T():
    """Compiled temp memory of the chunked gradient grows ~4x from T=1024 to 4096 (T x T would grow 16x)."""
    def temp_bytes(T):
        q, k, v, la = random_inputs(0, 1, T, 4, HKV, 16, 16, 16)
        f = jax.jit(jax.grad(lambda q, k, v, la: nha_attention(q, k, v, la, window=32, impl="chunked").sum(),
                             argnums=(0, 1, 2, 3)))
        return f.lower(q, k, v, la).compile().memory_analysis().temp_size_in_bytes
    small, large = temp_bytes(1024), temp_bytes(4096)
    assert large <= 5 * small, (small, large)
    assert large < 4096 * 4096 * 4 * 4  # less than one float32 T x T matrix per head


def test_jit_and_vmap_friendly():
    q, k, v, la = random_inputs(1, B, 20, 4, HKV, DK, DV, 4)
    f = jax.jit(lambda *x: nha_attention(*x, window=3, impl="chunked", chunk_size=8))
    assert max_rel_err(f(q, k, v, la), nha_attention(q, k, v, la, window=3, impl="naive")) <= 1e-5


@pytest.mark.parametrize("change,match", [
    (dict(k=np.zeros((2, 10, 3, 8)), v=np.zeros((2, 10, 3, 6)), log_alpha=np.zeros((2, 10, 3, 4))),
     "q heads H=4 must be a multiple"),
    (dict(k=np.zeros((2, 9, 2, 8))), "k must be"),
    (dict(v=np.zeros((2, 10, 1, 6))), "v must be"),
    (dict(log_alpha=np.zeros((2, 10, 2))), "log_alpha must be 4-D"),
    (dict(window=-1), "window must be an int >= 0"),
    (dict(window=2.5), "window must be an int >= 0"),
    (dict(window=0, log_alpha=np.zeros((2, 10, 2, 0))), "window = 0 with m = 0"),
    (dict(impl="flash"), "impl must be one of"),
    (dict(segment_ids=np.zeros((2, 9), np.int32)), "segment_ids must be"),
    (dict(segment_ids=np.zeros((2, 10), np.float32)), "segment_ids must be"),
    (dict(chunk_size=0), "chunk_size must be"),
    (dict(rope_theta=-1.0), "rope_theta must be > 0"),
    (dict(initial_state=init_state(2, 2, 4, 8, 6, window=5)), "initial_state.ring_k has shape"),
    (dict(impl="naive", return_state=True), "impl='naive' takes no initial_state"),
])
def test_bad_arguments_raise_clear_errors(change, match):
    args = dict(q=np.zeros((2, 10, 4, 8)), k=np.zeros((2, 10, 2, 8)), v=np.zeros((2, 10, 2, 6)),
                log_alpha=np.zeros((2, 10, 2, 4)), window=3)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        eager_nha_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("log_alpha"), **args)


@pytest.mark.parametrize("window,m", [(7, 0), (40, 0), (53, 5)])
def test_causal_softmax_route_equals_nha(window, m):
    """What impl='auto' hands to cuDNN on GPU: m = 0 (a sliding window when W < T), or a full window W >= T with m
    empty slots as zero sink tokens. Its XLA twin checks values and gradients here."""
    from nha_jax.ops.attention import causal_softmax_attention
    q, k, v, la = random_inputs(8, B, 40, 4, HKV, DK, DK, m)  # jax.nn.dot_product_attention needs dv == dk
    full = window >= 40

    def route(q, k, v):
        return causal_softmax_attention(q, k, v, scale=DK ** -0.5, rope_theta=10000.0, implementation="xla",
                                        window=None if full else window, sinks=m)

    def naive(q, k, v):
        return nha_attention(q, k, v, la, window=window, impl="naive")

    assert max_rel_err(route(q, k, v), naive(q, k, v)) <= 1e-5
    loss = lambda f: lambda *x: jnp.sum(jnp.sin(f(*x)))
    for got, want in zip(jax.grad(loss(route), (0, 1, 2))(q, k, v), jax.grad(loss(naive), (0, 1, 2))(q, k, v)):
        assert max_rel_err(got, want) <= 1e-5


def test_auto_hands_slotless_and_full_window_layers_to_cudnn_on_gpu(monkeypatch):
    """The GPU dispatch rule, checked on CPU with the GPU choice and the cuDNN call stood in for: m = 0 goes to cuDNN
    (with its window when W < T), a full window goes with m sinks, and a window layer with slots never does."""
    from nha_jax.ops import attention
    calls = []
    monkeypatch.setattr(attention, "_auto_impl", lambda: "pallas_triton")
    monkeypatch.setattr(attention, "causal_softmax_attention",
                        lambda q, k, v, **kw: calls.append(kw) or jnp.zeros(q.shape, q.dtype))
    monkeypatch.setattr(attention, "_kernel_call", lambda *a, **kw: calls.append("kernel") or (a[1], (None,) * 7))
    q, k, v, _ = random_inputs(3, 1, 16, 4, HKV, DK, DK, 0, dtype=jnp.bfloat16)
    gates = lambda m: jnp.zeros((1, 16, HKV, m), jnp.float32)
    eager_nha_attention(q, k, v, gates(0), window=5)
    eager_nha_attention(q, k, v, gates(0), window=16)
    eager_nha_attention(q, k, v, gates(4), window=16)
    eager_nha_attention(q, k, v, gates(4), window=5)
    assert [c if c == "kernel" else (c["window"], c["sinks"]) for c in calls] == [(5, 0), (None, 0), (None, 4),
                                                                                  "kernel"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="full window"):
        attention.causal_softmax_attention(q, k, v, scale=1.0, rope_theta=None, implementation="xla", window=5,
                                           sinks=2)


def test_rope_as_explicit_frequencies():
    """rope_theta may be the dk/2 inverse frequencies (scaled RoPE): theta's own frequencies give theta's result,
    other frequencies change only the window branch, and every impl agrees on them."""
    q, k, v, la = random_inputs(13, B, 33, 4, HKV, DK, DV, 8)
    theta_freqs = tuple(float(f) for f in 500.0 ** (-np.arange(DK // 2) / (DK // 2)))
    base = nha_attention(q, k, v, la, window=6, rope_theta=500.0, impl="chunked", chunk_size=16)
    same = nha_attention(q, k, v, la, window=6, rope_theta=theta_freqs, impl="chunked", chunk_size=16)
    assert max_rel_err(same, base) <= 1e-6
    scaled = tuple(f / 8 for f in theta_freqs)
    ref = nha_attention(q, k, v, la, window=6, rope_theta=scaled, impl="naive")
    assert max_rel_err(ref, base) > 1e-3
    for impl in ("chunked", "recurrent", "pallas_triton", "pallas_tpu"):  # the kernels run interpreted on CPU
        assert max_rel_err(nha_attention(q, k, v, la, window=6, rope_theta=scaled, impl=impl, chunk_size=16),
                           ref) <= 1e-4, impl
    with pytest.raises(ValueError, match="dk/2"):
        eager_nha_attention(q, k, v, la, window=6, rope_theta=scaled[:-1])


def test_decays_across_sub_chunks_stay_exact():
    """Runs of weak gates (decay ~1) that cross sub-chunk and chunk boundaries between runs of e^-30 gates, with a
    document boundary inside a chunk: the chunked path's factorised decays must match the dense form, values and
    gradients, to float32 precision (a difference of large cumulative gates would lose digits here)."""
    T, W, m = 70, 2, 4
    q, k, v, _ = random_inputs(17, 1, T, 2, 1, DK, DV, m)
    t = jnp.arange(T)[None, :, None, None]
    weak = ((t >= 5) & (t < 13)) | ((t >= 28) & (t < 37)) | (t >= 60)
    la = jnp.where(weak, -0.01, -30.0) * jax.random.uniform(jax.random.PRNGKey(18), (1, T, 1, m), minval=0.5)
    seg = jnp.asarray([[3] * 45 + [4] * 25])
    weights = jax.random.normal(jax.random.PRNGKey(19), (1, T, 2, DV))

    def out_and_grads(impl):  # one compilation gives both the output and all four gradients
        def run(*x):
            out, vjp = jax.vjp(lambda *x: nha_attention(*x, window=W, segment_ids=seg, impl=impl, chunk_size=32), *x)
            return out, vjp(weights)
        return jax.jit(run)(q, k, v, la)
    out, grads = out_and_grads("chunked")
    out_ref, grads_ref = out_and_grads("naive")
    assert max_rel_err(out, out_ref) <= 1e-5
    for name, a, b in zip(("dq", "dk", "dv", "dlog_alpha"), grads, grads_ref):
        assert max_rel_err(a, b) <= 1e-5, name
