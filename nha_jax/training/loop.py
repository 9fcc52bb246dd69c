"""The training loop: build everything from the config, resume, step, log, evaluate, checkpoint, stop cleanly.

Stopping rules: SIGTERM (preemption) -> finish the current step, save, return normally (train.py exits 0).
A non-finite loss or gradient norm -> raise NonFiniteLossError without saving (train.py exits 1); the last
checkpoint on disk is the last good state.
"""
from __future__ import annotations

import math
import signal
import threading

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nha_jax import data
from nha_jax.model import layer_windows
from nha_jax.sharding import logical_to_mesh_spec, make_mesh
from nha_jax.training.checkpoint import Checkpointer, restore_params
from nha_jax.training.config import save_run_config, validate, validate_for_devices
from nha_jax.training.metrics import (MetricsWriter, Throughput, peak_flops_per_device, progress_bar,
                                      train_flops_per_token)
from nha_jax.training.optimizer import build_optimizer, learning_rate_schedule
from nha_jax.training.state import count_params, state_layout
from nha_jax.training.step import jit_train_step, make_eval_step

VOCAB_MULTIPLE = 128  # an automatic vocab is padded so that the vocab axis splits evenly over tensor devices


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; nothing was saved for that step."""


class PreemptionFlag:
    """Set by SIGTERM; the loop checks it after every step. Restores the previous handler on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def resolve_vocab_size(config: ml_collections.ConfigDict) -> None:
    """model.vocab_size = 0 -> the tokenizer's size rounded up to VOCAB_MULTIPLE; a set size must cover it."""
    tokenizer_vocab = data.build_tokenizer(config.data).vocab_size
    if config.model.vocab_size == 0:
        config.model.vocab_size = -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    elif config.model.vocab_size < tokenizer_vocab:
        raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer_vocab}; set it to 0 (automatic) or at least {tokenizer_vocab}.")


def _check_finite(step: int, metrics: dict) -> None:
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteLossError(
            f"step {step}: loss={loss}, grad_norm={grad_norm} is not finite; stopping without saving. The last "
            "checkpoint in the workdir is the last good state: lower optimizer.peak_lr or raise warmup_steps, "
            "then resume.")


def train(config: ml_collections.ConfigDict) -> dict:
    """Runs (or resumes) training as configured; returns a summary dict.

    Raises ConfigError on bad config values, NonFiniteLossError on NaN/inf. On SIGTERM it saves and returns with
    summary["preempted"] = True.
    """
    validate(config)
    config = ml_collections.ConfigDict(config.to_dict())  # private copy: vocab resolution must not leak out
    resolve_vocab_size(config)
    mesh_shape = validate_for_devices(config, jax.device_count(), jax.process_count())
    mesh = make_mesh(*mesh_shape)
    is_chief = jax.process_index() == 0
    if is_chief:
        save_run_config(config.workdir, config)

    schedule = learning_rate_schedule(config.optimizer, config.total_steps)
    optimizer = build_optimizer(config.optimizer, config.total_steps)
    layout = state_layout(config, optimizer, mesh)
    windows = layer_windows(config.model, config.seq_len)
    batch_sharding = NamedSharding(mesh, logical_to_mesh_spec(("batch", "seq")))
    replicated = NamedSharding(mesh, PartitionSpec())

    with jax.set_mesh(mesh):
        train_step = jit_train_step(layout, optimizer, schedule, config.grad_accum_steps, batch_sharding)
        eval_step = jax.jit(make_eval_step(layout.graphdef),
                            in_shardings=(layout.shardings["params"], batch_sharding), out_shardings=replicated)
        diagnostic = jax.jit(lambda params, tokens: nnx.merge(layout.graphdef, params).long_term_shares(tokens),
                             in_shardings=(layout.shardings["params"], replicated), out_shardings=replicated)

        train_iter = data.build_train_iterator(config.data, seq_len=config.seq_len,
                                               global_batch_size=config.global_batch_size, seed=config.seed,
                                               process_index=jax.process_index(), process_count=jax.process_count())
        checkpointer = Checkpointer(config.workdir, keep=config.keep_checkpoints,
                                    async_save=config.async_checkpoints)
        start_step = checkpointer.latest_step()
        if start_step is None:
            start_step = 0
            state = jax.jit(layout.init_fn, out_shardings=layout.shardings)(jax.random.PRNGKey(config.seed))
            if config.get("init_params"):  # converted weights; the fresh optimizer moments do not depend on params
                state["params"] = restore_params(config.init_params, layout.abstract_with_shardings()["params"])
        else:
            state, data_state = checkpointer.restore(start_step, layout.abstract_with_shardings())
            train_iter.set_state(data_state)

        def to_global(batch):
            return {name: jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch[name]))
                    for name in ("inputs", "targets", "segment_ids", "loss_mask")}

        tokens_per_step = config.global_batch_size * config.seq_len
        flops_per_token = train_flops_per_token(layout.abstract_state["params"], config.model, windows,
                                                config.seq_len)
        peak = peak_flops_per_device(jax.devices()[0])
        throughput = Throughput(tokens_per_step, flops_per_token, peak and peak * jax.device_count(), start_step)
        writer = MetricsWriter(config.workdir, enabled=is_chief)
        bar = progress_bar(config.total_steps, start_step, enabled=is_chief and config.progress_bar)
        if is_chief:
            print(f"nha-jax: {count_params(layout.abstract_state['params']) / 1e6:.2f}M params, windows {windows}, "
                  f"mesh {dict(zip(mesh.axis_names, mesh_shape))}, "
                  f"{'resuming from step ' + str(start_step) if start_step else 'starting from scratch'}", flush=True)

        history = []
        preempted = False
        step = start_step
        try:
            with PreemptionFlag() as preemption:
                previous = None
                while step < config.total_steps:
                    state, metrics = train_step(state, to_global(next(train_iter)))
                    step += 1
                    if previous is not None:  # checked one step late so the host never stalls the device
                        _check_finite(*previous)
                    previous = (step, metrics)

                    record = {}
                    if step % config.log_every == 0 or step == config.total_steps:
                        _check_finite(step, metrics)
                        tokens_per_sec, mfu = throughput.measure(step)
                        record = {name: float(value) for name, value in jax.device_get(metrics).items()}
                        record.update(tokens_per_sec=tokens_per_sec, mfu=mfu)
                    if config.eval_every and (step % config.eval_every == 0 or step == config.total_steps):
                        record["eval_loss"] = _evaluate(config, eval_step, state["params"], to_global)
                    if config.diagnostic_every and step % config.diagnostic_every == 0:
                        record["long_term_share"] = _long_term_shares(config, diagnostic, state["params"], replicated)
                    if record:
                        writer.write(step, record)
                        history.append({"step": step, **record})
                        bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "tokens_per_sec", "mfu")
                                         if k in record})
                    bar.update(1)

                    preempted = preemption.requested
                    if (config.checkpoint_every and step % config.checkpoint_every == 0) or preempted \
                            or step == config.total_steps:
                        _check_finite(step, metrics)
                        checkpointer.save(step, state, train_iter.get_state())
                    if preempted:
                        break
        finally:
            checkpointer.wait()
            checkpointer.close()
            bar.close()
            writer.close()

    summary = _summary(history, start_step, step, preempted, flops_per_token, peak)
    if is_chief:
        print("nha-jax summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in summary.items()), flush=True)
    return summary


def _evaluate(config, eval_step, params, to_global) -> float:
    """Mean loss per token over the first eval_batches batches of the held-out split."""
    eval_iter = data.build_eval_iterator(config.data, seq_len=config.seq_len,
                                         global_batch_size=config.global_batch_size,
                                         process_index=jax.process_index(), process_count=jax.process_count())
    loss_sum, count = 0.0, 0.0
    for _, batch in zip(range(config.eval_batches), eval_iter):
        batch_loss, batch_count = eval_step(params, to_global(batch))
        loss_sum, count = loss_sum + float(batch_loss), count + float(batch_count)
    return loss_sum / max(count, 1.0)


def _long_term_shares(config, diagnostic, params, replicated) -> list[float]:
    """Per-layer slot share of attention mass on the first document of the first held-out row."""
    eval_iter = data.build_eval_iterator(config.data, seq_len=config.seq_len,
                                         global_batch_size=config.global_batch_size)
    row = next(iter(eval_iter))
    first_document = row["segment_ids"][0] == row["segment_ids"][0, 0]
    tokens = row["inputs"][0][first_document][:config.diagnostic_tokens]
    tokens = jax.make_array_from_process_local_data(replicated, np.asarray(tokens, np.int32))
    return [float(x) for x in diagnostic(params, tokens)]


def _summary(history, start_step, final_step, preempted, flops_per_token, peak) -> dict:
    """Final numbers: first/last logged loss, last eval loss, median throughput (first interval has compile)."""
    logged = [h for h in history if "loss" in h]
    timed = logged[1:] or logged
    summary = {"steps_run": final_step - start_step, "final_step": final_step, "preempted": preempted,
               "flops_per_token": float(flops_per_token), "peak_flops_per_device": float(peak or 0.0)}
    if logged:
        summary.update(first_loss=logged[0]["loss"], final_loss=logged[-1]["loss"],
                       tokens_per_sec=float(np.median([h["tokens_per_sec"] for h in timed])),
                       mfu=float(np.median([h["mfu"] for h in timed])))
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if evals:
        summary["final_eval_loss"] = evals[-1]
    return summary
