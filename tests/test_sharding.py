"""Sharding: 8 fake CPU devices as data x fsdp x tensor = 2 x 2 x 2 give the single-device loss, gradients and
update; gradient accumulation gives the unaccumulated update; the mesh arithmetic rejects what cannot fit."""
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ lives at the repo root
from configs.common import base_config  # noqa: E402
from nha_jax.sharding import logical_to_mesh_spec, make_mesh, resolve_mesh_shape
from nha_jax.training.optimizer import build_optimizer, learning_rate_schedule
from nha_jax.training.state import state_layout
from nha_jax.training.step import loss_sum_and_count, make_train_step


def small_config():
    config = base_config()
    config.seq_len = 32
    config.global_batch_size = 8
    # One layer with both slots and a window; the dense reference operator compiles fastest on CPU (the
    # operator's own fast paths are tested against it in the ops tests).
    config.model.update(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                        v_head_dim=8, mlp_hidden=64, num_slots=4, window=8, block_size=0, attention_impl="naive",
                        compute_dtype="float32")
    config.optimizer.warmup_steps = 0
    return config


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.global_batch_size, config.seq_len)
    tokens = rng.integers(0, config.model.vocab_size, size=(shape[0], shape[1] + 1)).astype(np.int32)
    segment_ids = np.where(np.arange(shape[1]) < 20, 1, 2).astype(np.int32) * np.ones(shape, np.int32)
    loss_mask = np.ones(shape, np.float32)
    loss_mask[:, 19] = 0.0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids, "loss_mask": loss_mask}


def assert_trees_close(actual, desired, rtol=1e-4):
    """Elementwise, with an absolute floor relative to each array's scale (float32 sums in another order)."""
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max()),
                 actual, desired)


def setup_on_mesh(config, mesh_shape, optimizer):
    """(mesh, layout, initial state, batch sharding) on a mesh of the first prod(mesh_shape) devices."""
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    layout = state_layout(config, optimizer, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(layout.init_fn, out_shardings=layout.shardings)(jax.random.PRNGKey(0))
    return mesh, layout, state, NamedSharding(mesh, logical_to_mesh_spec(("batch", "seq")))


def loss_and_grads_on_mesh(config, mesh_shape, batch):
    """(mean loss, grads of the mean loss) for `batch` on the mesh, plus the sharded train step's reported loss."""
    optimizer = build_optimizer(config.optimizer, config.total_steps)
    mesh, layout, state, batch_sharding = setup_on_mesh(config, mesh_shape, optimizer)
    with jax.set_mesh(mesh):
        batch = jax.device_put(batch, batch_sharding)
        grad_fn = jax.jit(jax.grad(lambda params, b: loss_sum_and_count(params, layout.graphdef, b), has_aux=True))
        grads, count = grad_fn(state["params"], batch)
        grads = jax.device_get(jax.tree.map(lambda g: g / count, grads))
        step = jax.jit(make_train_step(layout.graphdef, optimizer,
                                       learning_rate_schedule(config.optimizer, config.total_steps), 1),
                       in_shardings=(layout.shardings, batch_sharding), out_shardings=(layout.shardings, None))
        new_state, metrics = step(state, batch)
    kernel = new_state["params"]["blocks"][0]["attn"]["q_proj"]["kernel"]
    return float(metrics["loss"]), grads, kernel.sharding


def test_sharded_equals_single_device():
    config = small_config()
    batch = random_batch(config)
    loss_1, grads_1, _ = loss_and_grads_on_mesh(config, (1, 1, 1), batch)
    loss_8, grads_8, kernel_sharding = loss_and_grads_on_mesh(config, (2, 2, 2), batch)
    assert kernel_sharding.spec == logical_to_mesh_spec(("embed", "heads"))  # really split over fsdp x tensor
    assert len(kernel_sharding.device_set) == 8
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    assert_trees_close(grads_8, grads_1)


def test_gradient_accumulation_equals_one_big_batch():
    """With SGD(lr=1) the update is minus the gradient, so equal new params mean equal accumulated gradients."""
    config = small_config()
    batch = random_batch(config, seed=1)
    batch["loss_mask"][:3, 25:] = 0.0  # microbatches with different token counts: the mean must still be global
    sgd = optax.sgd(1.0)
    mesh, layout, state, batch_sharding = setup_on_mesh(config, (1, 1, 1), sgd)
    results = []
    for accum_steps in (1, 4):
        step = jax.jit(make_train_step(layout.graphdef, sgd, optax.constant_schedule(1.0), accum_steps))
        with jax.set_mesh(mesh):
            new_state, metrics = step(state, jax.device_put(batch, batch_sharding))
        results.append((float(metrics["loss"]), jax.device_get(new_state["params"])))
    (loss_1, params_1), (loss_4, params_4) = results
    np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
    assert_trees_close(params_4, params_1, rtol=1e-5)


def test_mesh_shape_fill_and_errors():
    assert resolve_mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
    assert resolve_mesh_shape(1, -1, 1, 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="mesh.data"):
        resolve_mesh_shape(3, 1, 1, 8)
    with pytest.raises(ValueError, match="mesh.fsdp=-1 cannot fill"):
        resolve_mesh_shape(3, -1, 1, 8)
    with pytest.raises(ValueError, match="both -1"):
        resolve_mesh_shape(-1, -1, 1, 8)
