"""The model: window schedules, baselines from the same code, document isolation, the long-term share probe."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from nha_jax import ops
from nha_jax.layers import long_term_share
from nha_jax.model import LanguageModel, layer_windows, schedule_period
from nha_jax.training.step import token_losses
from nha_testing import live_equations, nested_equations

SEQ = 48


def tiny_model_config(**changes) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(
        vocab_size=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=8,
        mlp_hidden=64, num_slots=4, window=6, block_size=2, full_idx=1, windows=(), gate_temperature=8.0,
        rope_theta=10000.0, init_std=0.02, attention_impl="auto", chunk_size=16, compute_dtype="float32",
        remat="none"))
    config.update(changes)
    return config


def test_window_schedule_paper_style_and_explicit():
    paper = tiny_model_config(num_layers=6, window=32, block_size=3, full_idx=2)
    assert layer_windows(paper, 2048) == [32, 32, 2048, 32, 32, 2048]
    assert layer_windows(tiny_model_config(num_layers=3, block_size=0, window=0), 64) == [0, 0, 0]
    assert layer_windows(tiny_model_config(windows=(5, 0)), 64) == [5, 0]
    with pytest.raises(ValueError, match="model.windows has 3 entries"):
        layer_windows(tiny_model_config(windows=(1, 2, 3)), 64)


def three_document_batch(rng, vocab):
    """One row of three packed documents (lengths 20, 13, 15) in the data interface's layout."""
    lengths = (20, 13, 15)
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
    tokens = rng.integers(0, vocab, size=(1, SEQ + 1)).astype(np.int32)
    same_document = np.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], np.zeros((1, 1), bool)], axis=1)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
            "loss_mask": same_document.astype(np.float32)}


@pytest.mark.parametrize("model_changes", [
    dict(),  # NHA: window 6 with slots, and a full layer
    dict(num_slots=0, block_size=1, full_idx=0),  # Transformer++: every window full, no slots
    dict(window=0, block_size=0),  # GSA: slots only
], ids=["nha", "transformer", "gsa"])
def test_no_loss_or_attention_crosses_a_document_boundary(model_changes):
    config = tiny_model_config(**model_changes)
    model = LanguageModel(config, seq_len=SEQ, rngs=nnx.Rngs(params=jax.random.PRNGKey(0)))
    losses_of = nnx.jit(token_losses)
    batch = three_document_batch(np.random.default_rng(0), config.vocab_size)
    changed = {name: value.copy() for name, value in batch.items()}
    middle = batch["segment_ids"][0] == 2
    changed["inputs"][0, middle] = (changed["inputs"][0, middle] + 7) % config.vocab_size

    before, after = np.asarray(losses_of(model, batch)), np.asarray(losses_of(model, changed))
    assert np.all(np.isfinite(before))
    # The loss mask stops each document's last token from predicting the next document's first.
    np.testing.assert_array_equal(before[0, [19, 32, 47]], 0.0)
    np.testing.assert_allclose(after[0, ~middle], before[0, ~middle], rtol=1e-6, atol=1e-6)
    assert np.abs(after[0, middle] - before[0, middle]).max() > 1e-3  # the edit does reach its own document


def test_long_term_share_matches_the_operator():
    """One-hot values (value of token j = e_j) turn the operator's output into attention weights: the window part
    of o_t sums the window probabilities, so the slot share is 1 - that sum. Gates ~0 make every slot hold the
    token that just left the window, whose index then carries exactly the slot share."""
    T, H, Hkv, dk, m, window = 12, 4, 2, 8, 3, 4
    q = jax.random.normal(jax.random.PRNGKey(1), (T, H, dk))
    k = jax.random.normal(jax.random.PRNGKey(2), (T, Hkv, dk))
    log_alpha = jnp.full((T, Hkv, m), -40.0)
    one_hot_values = jnp.broadcast_to(jnp.eye(T)[:, None, :], (T, Hkv, T))
    naive = jax.jit(lambda *args: ops.nha_attention(*args, window=window, impl="naive"))
    out = naive(q[None], k[None], one_hot_values[None], log_alpha[None])[0]

    t, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    in_window = (j <= t) & (j > t - window)  # [T, T]
    window_mass = jnp.einsum("thj,tj->th", out, in_window.astype(out.dtype))
    share = jax.jit(lambda *args: long_term_share(*args, window=window, rope_theta=10000.0))(q, k, log_alpha)
    np.testing.assert_allclose(share, 1.0 - window_mass, rtol=1e-5, atol=1e-5)
    late = jnp.arange(window, T)
    np.testing.assert_allclose(share[window:], out[late, :, late - window], rtol=1e-5, atol=1e-5)
    assert float(share.min()) > 0.0 and float(share.max()) < 1.0


def test_layer_scan_equals_unrolled_layers():
    """Four layers with period 2 run as a scan over two groups; the loss and every gradient equal the unrolled model."""
    config = tiny_model_config(num_layers=4, remat="full", attention_impl="naive")  # the operator is not under test
    assert schedule_period(layer_windows(config, SEQ)) == 2
    assert schedule_period([4, 0, 4, 0]) == 2 and schedule_period([4, 0, 0]) == 3
    batch = three_document_batch(np.random.default_rng(1), config.vocab_size)

    def loss_and_grads(scan_layers):
        config.scan_layers = scan_layers
        graphdef, params = nnx.split(LanguageModel(config, seq_len=SEQ, rngs=nnx.Rngs(params=jax.random.PRNGKey(0))))
        mean_loss = lambda p: jnp.mean(token_losses(nnx.merge(graphdef, p), batch))
        return jax.jit(jax.value_and_grad(mean_loss))(params)

    (scanned_loss, scanned_grads), (unrolled_loss, unrolled_grads) = loss_and_grads(True), loss_and_grads(False)
    np.testing.assert_allclose(scanned_loss, unrolled_loss, rtol=1e-6)
    for scanned, unrolled in zip(jax.tree.leaves(scanned_grads), jax.tree.leaves(unrolled_grads)):
        np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-7)


def float32_matmuls(jaxpr) -> list[tuple[str, list[tuple[int, ...]]]]:
    """The dot_generals of a jaxpr, nested ones included, that take a float32 operand: (equation, operand shapes)."""
    return [(str(eqn), [tuple(v.aval.shape) for v in eqn.invars]) for eqn, _ in nested_equations(jaxpr)
            if eqn.primitive.name == "dot_general" and any(v.aval.dtype == jnp.float32 for v in eqn.invars)]


def test_bf16_model_gradient_has_no_float32_matmul():
    """With bf16 compute every matmul of the dense layers and the head, forward and backward, takes bf16 operands
    (a float32 one runs at half the tensor-core rate), and the logits stay float32 for the loss."""
    d_model, vocab, hidden = 56, 40, 72  # sizes no attention tensor has: they mark the dense layers' matmuls
    config = tiny_model_config(compute_dtype="bfloat16", d_model=d_model, vocab_size=vocab, mlp_hidden=hidden)
    model = LanguageModel(config, seq_len=SEQ, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((2, SEQ), jnp.int32)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens)
        assert logits.dtype == jnp.float32
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    dense = [eqn for eqn, shapes in float32_matmuls(jaxpr) if {d_model, vocab, hidden} & set(sum(shapes, ()))]
    assert not dense, dense[:2]


def test_remat_policy_dots_and_attention_keeps_cudnn_attention_from_running_again(monkeypatch):
    """The full-window layers' cuDNN flash attention (and Transformer++'s): under "dots_and_attention" its forward
    runs once per step, its output and softmax statistics kept for the backward. Traced only (no cuDNN on CPU)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
    from nha_jax.model import REMAT_POLICIES
    from nha_jax.ops.attention import causal_softmax_attention
    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda *_: 91000)
    monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda *_: True, raising=False)
    x = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
    eye = jnp.eye(64, dtype=x.dtype)

    def block(x):  # attention between two matmuls, as in the model
        out = causal_softmax_attention(x @ eye, x, x, scale=0.125, rope_theta=10000.0, implementation="cudnn",
                                       sinks=16)
        return out @ eye

    def live_attention_forwards(policy):
        loss = lambda x: jnp.sum(jax.checkpoint(block, policy=REMAT_POLICIES[policy])(x).astype(jnp.float32))
        return live_equations(jax.make_jaxpr(jax.grad(loss))(x).jaxpr,
                              lambda eqn: eqn.primitive.name == "dot_product_attention_fwd_wrapper")

    assert live_attention_forwards("dots_with_no_batch_dims_saveable") == 2  # forward, and again in the backward
    assert live_attention_forwards("dots_and_attention") == 1
    assert live_attention_forwards("full") == 2


def test_logits_matmul_gradient_matches_plain_dot():
    from nha_jax.layers import logits_matmul
    h = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16), jnp.float32)
    head = jax.random.normal(jax.random.PRNGKey(1), (16, 40), jnp.float32)
    weights = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 40), jnp.float32)
    ours = jax.grad(lambda h, w: jnp.sum(logits_matmul(h, w) * weights), argnums=(0, 1))(h, head)
    plain = jax.grad(lambda h, w: jnp.sum(jnp.dot(h, w, precision="highest") * weights), argnums=(0, 1))(h, head)
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    bf16 = jax.grad(lambda h, w: jnp.sum(logits_matmul(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)) * weights),
                    argnums=(0, 1))(h, head)
    for a, b in zip(bf16, plain):
        assert jnp.linalg.norm(a - b) / jnp.linalg.norm(b) < 1e-2
