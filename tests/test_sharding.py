"""Sharding: 8 fake CPU devices as data x fsdp x tensor = 2 x 2 x 2 give the single-device loss, gradients and
update; gradient accumulation gives the unaccumulated update; the mesh arithmetic rejects what cannot fit."""
import sys
from pathlib import Path

import jax
import numpy as np
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
    config.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                        v_head_dim=8, mlp_hidden=64, num_slots=4, window=8, block_size=2, full_idx=1, chunk_size=16,
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


def run_on_mesh(config, mesh_shape, batch):
    """(loss, grads, updated params) of one train step on a mesh of the first prod(mesh_shape) devices."""
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = make_mesh(*mesh_shape, devices=devices)
    optimizer = build_optimizer(config.optimizer, config.total_steps)
    layout = state_layout(config, optimizer, mesh)
    batch_sharding = NamedSharding(mesh, logical_to_mesh_spec(("batch", "seq")))
    with jax.set_mesh(mesh):
        state = jax.jit(layout.init_fn, out_shardings=layout.shardings)(jax.random.PRNGKey(0))
        batch = jax.device_put(batch, batch_sharding)
        grad_fn = jax.jit(jax.grad(lambda params, b: loss_sum_and_count(params, layout.graphdef, b), has_aux=True))
        grads, count = grad_fn(state["params"], batch)
        step = jax.jit(make_train_step(layout.graphdef, optimizer,
                                       learning_rate_schedule(config.optimizer, config.total_steps),
                                       config.grad_accum_steps),
                       in_shardings=(layout.shardings, batch_sharding), out_shardings=(layout.shardings, None))
        new_state, metrics = step(state, batch)
    if mesh_shape == (2, 2, 2):
        kernel_sharding = new_state["params"]["blocks"][0]["attn"]["q_proj"]["kernel"].sharding
        assert kernel_sharding.spec == logical_to_mesh_spec(("embed", "heads"))  # fsdp x tensor, really sharded
    return float(metrics["loss"]), jax.device_get(grads), jax.device_get(new_state["params"]), float(count)


def test_sharded_equals_single_device():
    config = small_config()
    batch = random_batch(config)
    loss_1, grads_1, params_1, count_1 = run_on_mesh(config, (1, 1, 1), batch)
    loss_8, grads_8, params_8, count_8 = run_on_mesh(config, (2, 2, 2), batch)
    assert count_1 == count_8 == config.global_batch_size * (config.seq_len - 1)
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads_8, grads_1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_8, params_1)


def test_gradient_accumulation_equals_one_big_batch():
    config = small_config()
    batch = random_batch(config, seed=1)
    batch["loss_mask"][:3, 25:] = 0.0  # microbatches with different token counts: the mean must still be global
    loss_1, _, params_1, _ = run_on_mesh(config, (1, 1, 1), batch)
    config.grad_accum_steps = 4
    loss_4, _, params_4, _ = run_on_mesh(config, (1, 1, 1), batch)
    np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_4, params_1)


def test_mesh_shape_fill_and_errors():
    assert resolve_mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
    assert resolve_mesh_shape(1, -1, 1, 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="mesh.data"):
        resolve_mesh_shape(3, 1, 1, 8)
    with pytest.raises(ValueError, match="mesh.fsdp=-1 cannot fill"):
        resolve_mesh_shape(3, -1, 1, 8)
    with pytest.raises(ValueError, match="both -1"):
        resolve_mesh_shape(-1, -1, 1, 8)
