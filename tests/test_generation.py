"""Generation through the per-layer caches: exactness against full forward passes, sampling and EOS, constant NHA
memory. (The CLI runs on a checkpoint in tests/test_eval.py, which builds one.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import base_config
from nha_jax import generation
from nha_jax.model import LanguageModel

TRAIN_LEN = 16


def tiny_model_config():
    """3 layers: NHA (window 3, 4 slots), GSA (window 0) and full (64 >= the train length 16); GQA 4 q / 2 kv heads."""
    model = base_config().model
    model.update(vocab_size=61, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=8,
                 num_slots=4, windows=(3, 0, 64), compute_dtype="float32", attention_impl="chunked", chunk_size=8,
                 init_std=0.3)
    return model


def build(model_cfg, seq_len, seed=0):
    return LanguageModel(model_cfg, seq_len=seq_len, rngs=nnx.Rngs(params=jax.random.PRNGKey(seed)))


def jitted(model, method):
    """method(model, *args) under one jax.jit (eager NNX calls compile op by op: slow on a 2-core CI)."""
    graphdef, params = nnx.split(model)
    return jax.jit(lambda params, *args: method(nnx.merge(graphdef, params), *args)).__get__(params)


@pytest.fixture(scope="module")
def nha_model():
    return build(tiny_model_config(), TRAIN_LEN)


@pytest.fixture(scope="module")
def forward(nha_model):
    """The model's forward pass, jitted once for the module (every test calls it on [3, 27] tokens)."""
    return jitted(nha_model, LanguageModel.__call__)


def test_greedy_generation_equals_argmax_of_full_forward(nha_model, forward):
    """Prompts of lengths 2..9 grow to 27 tokens, past the train length (16) and the window: tokens move from the
    ring into the slots, and the full layer's KV cache attends to everything, as the forward pass's window of 64
    does."""
    model = nha_model
    assert generation.full_layers(model, TRAIN_LEN) == (False, False, True)

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 61, size=n).tolist() for n in (9, 2, 5)]
    result = generation.generate(model, prompts, seq_len=TRAIN_LEN, max_new_tokens=18)
    assert result.tokens.shape == (3, 18) and (result.lengths == 18).all()
    # One forward pass over all rows, right-padded to one length (a causal model never looks right).
    sequences = np.zeros((3, 9 + 18), np.int32)
    for row, (prompt, generated) in enumerate(zip(prompts, result.tokens)):
        sequences[row, :len(prompt) + 18] = prompt + generated.tolist()
    logits = forward(jnp.asarray(sequences))
    for row, (prompt, generated) in enumerate(zip(prompts, result.tokens)):
        np.testing.assert_array_equal(np.argmax(logits[row, len(prompt) - 1:len(prompt) + 17], axis=-1), generated)


def test_decode_step_logits_match_forward(nha_model, forward):
    """The cached logits themselves, not only their argmax, match a forward pass (float32, tolerance 1e-4)."""
    tokens = np.random.default_rng(1).integers(3, 61, size=(3, 27)).astype(np.int32)
    full = generation.full_layers(nha_model, TRAIN_LEN)
    prefill = jitted(nha_model, lambda model, tokens, mask: generation.prefill(model, tokens, mask, full=full,
                                                                                max_context=27))
    decode = jitted(nha_model, generation.decode_step)
    logits, state = prefill(jnp.asarray(tokens[:, :5]), jnp.ones((3, 5), bool))
    expected = forward(jnp.asarray(tokens))
    np.testing.assert_allclose(logits, expected[:, 4], atol=1e-4, rtol=1e-4)
    for t in range(5, 27):
        logits, state = decode(state, jnp.asarray(tokens[:, t]))
        np.testing.assert_allclose(logits, expected[:, t], atol=1e-4, rtol=1e-4)


def test_sampling_filters_and_eos(nha_model):
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 256))
    keys = jax.random.split(jax.random.PRNGKey(0), 1)[0]
    top2 = generation.sample(logits, keys, temperature=1.0, top_k=2, top_p=1.0)
    assert set(np.asarray(top2).tolist()) == {0, 1}
    nucleus = generation.sample(logits, keys, temperature=1.0, top_k=0, top_p=0.7)  # 0.5 + 0.3 reach 0.7
    assert set(np.asarray(nucleus).tolist()) == {0, 1}
    assert set(np.asarray(generation.sample(logits, keys, temperature=1.0, top_k=0, top_p=1.0)).tolist()) == {0, 1, 2, 3}

    greedy = generation.generate(nha_model, [[5, 6, 7]], seq_len=TRAIN_LEN, max_new_tokens=6)
    eos = int(greedy.tokens[0, 2])
    stopped = generation.generate(nha_model, [[5, 6, 7]], seq_len=TRAIN_LEN, max_new_tokens=6, eos_id=eos, pad_id=0)
    first_eos = int(np.argmax(greedy.tokens[0] == eos))
    assert stopped.lengths[0] == first_eos + 1
    np.testing.assert_array_equal(stopped.tokens[0, :first_eos + 1], greedy.tokens[0, :first_eos + 1])
    assert (stopped.tokens[0, first_eos + 1:] == 0).all()


def test_nha_cache_size_does_not_grow_with_context(nha_model):
    """NHA and GSA layers hold the same bytes for a 32- and a 512-token context; the full layer's cache grows 16x."""
    model = nha_model
    full = generation.full_layers(model, TRAIN_LEN)
    prompt = jnp.ones((1, 4), jnp.int32)
    mask = jnp.ones((1, 4), bool)
    short = jax.eval_shape(lambda: generation.prefill(model, prompt, mask, full=full, max_context=32)[1])
    long = jax.eval_shape(lambda: generation.prefill(model, prompt, mask, full=full, max_context=512)[1])
    short_bytes, long_bytes = generation.cache_bytes(short), generation.cache_bytes(long)
    assert short_bytes[:2] == long_bytes[:2] and min(short_bytes[:2]) > 0
    assert long_bytes[2] > 15 * short_bytes[2]


def test_bad_arguments_are_rejected(nha_model):
    model = nha_model
    with pytest.raises(ValueError, match="non-empty"):
        generation.generate(model, [[1], []], seq_len=TRAIN_LEN, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generation.generate(model, [[1]], seq_len=TRAIN_LEN, max_new_tokens=2, top_p=0.0)
