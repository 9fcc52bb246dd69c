"""The loss and the jitted train / eval steps (gradient accumulation is a lax.scan over microbatches inside one jit).

A batch is the data interface's dict: inputs, targets, segment_ids, positions (int32 [B, T]) and loss_mask
(float32 [B, T], 0 at padding and across document boundaries). The model restarts attention and RoPE per segment;
the loss mask keeps the loss inside documents.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nha_jax.sharding import constrain

MODEL_INPUTS = ("inputs", "targets", "segment_ids", "loss_mask")


def token_losses(model: nnx.Module, batch: dict) -> jax.Array:
    """Per-token cross-entropy [B, T] float32, zero where loss_mask is 0."""
    logits = model(batch["inputs"], batch["segment_ids"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return losses * batch["loss_mask"]


def loss_sum_and_count(params: nnx.State, graphdef: nnx.GraphDef, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses, number of loss tokens) for one (micro)batch."""
    model = nnx.merge(graphdef, params)
    return jnp.sum(token_losses(model, batch)), jnp.sum(batch["loss_mask"])


def split_microbatches(batch: dict, accum_steps: int) -> dict:
    """[B, T] -> [accum_steps, B / accum_steps, T], microbatch a = rows a, a + A, a + 2A, ...

    Strided rather than contiguous so that every device keeps its own rows in every microbatch: the batch axis is
    sharded in contiguous blocks, and a contiguous split would put each microbatch on a few devices only.
    """
    def split(x):
        if x is None:  # segment_ids=None: one document per row
            return None
        rows = x.shape[0] // accum_steps
        micro = x.reshape(rows, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return constrain(micro, (None, "batch", "seq"))

    return {name: split(batch[name]) for name in MODEL_INPUTS}


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    accum_steps: int) -> Callable:
    """Returns train_step(state, batch) -> (state, metrics), to be wrapped in jax.jit by the caller.

    state: {"params", "opt_state", "step", "rng"}; rng is the run's base key (stochastic layers, if any are added,
    draw fold_in(rng, step)), carried so that a resumed run has the same randomness.
    The gradient is of the mean loss over every loss token of the whole global batch (summed over microbatches,
    then divided once), so accumulation does not change it.
    metrics: loss, grad_norm (before clipping), learning_rate (the one this update used), loss_tokens.
    """
    grad_fn = jax.value_and_grad(loss_sum_and_count, has_aux=True)

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        params = state["params"]

        def accumulate(carry, microbatch):
            grad_sum, loss_sum, count = carry
            (loss, tokens), grads = grad_fn(params, graphdef, microbatch)
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, count + tokens), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grad_sum, loss_sum, count), _ = jax.lax.scan(accumulate, init, split_microbatches(batch, accum_steps))
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grad_sum)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": state["rng"]}
        metrics = {"loss": loss_sum / denominator, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state["step"]), "loss_tokens": count}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """Returns eval_step(params, batch) -> (loss sum, loss token count), to be jitted by the caller."""

    def eval_step(params: nnx.State, batch: dict) -> tuple[jax.Array, jax.Array]:
        return loss_sum_and_count(params, graphdef, batch)

    return eval_step


def jit_train_step(layout, optimizer: optax.GradientTransformation, schedule: optax.Schedule, accum_steps: int,
                   batch_sharding: NamedSharding) -> Callable:
    """make_train_step under jax.jit as every caller runs it (the training loop, nha_jax.aot, bench/bench_train.py):
    the state sharded by layout.shardings and donated, the batch sharded by batch_sharding, metrics replicated."""
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(make_train_step(layout.graphdef, optimizer, schedule, accum_steps),
                   in_shardings=(layout.shardings, batch_sharding), out_shardings=(layout.shardings, replicated),
                   donate_argnums=0)
