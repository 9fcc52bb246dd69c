"""The trainer end to end on the embedded corpus: it learns, resumes exactly after preemption, stops on NaN with the
last good checkpoint intact, ignores half-written checkpoints, and rejects bad configs with exit code 2."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train.py and configs/ live at the repo root, outside the installed package

import train as train_cli  # noqa: E402
from configs.common import base_config  # noqa: E402
from nha_jax import data  # noqa: E402
from nha_jax.training import NonFiniteLossError, train  # noqa: E402
from nha_testing import persistent_compilation_cache  # noqa: E402
from nha_jax.training import step as step_module  # noqa: E402
from nha_jax.training.checkpoint import Checkpointer  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs that stop and resume compile the same programs again: a persistent cache makes the repeats cheap."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")):
        yield


def tiny_config(workdir, attention_impl="naive", **top_level):
    """A 2-layer NHA LM (one window-8 layer with slots, one full layer) on 8 x 64 byte rows, one per fake device.

    The trainer's own tests (resume, NaN, preemption) run the dense "naive" operator, the fastest to compile on
    the CPU; the learning test keeps the default ("auto" = chunked on the CPU)."""
    config = base_config()
    config.workdir = str(workdir)
    config.seq_len = 64
    config.global_batch_size = 8
    config.total_steps = 6
    config.log_every = 1
    config.eval_every = 0
    config.diagnostic_every = 0
    config.checkpoint_every = 0
    config.async_checkpoints = True
    config.progress_bar = False
    config.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16,
                        mlp_hidden=128, num_slots=8, window=8, block_size=2, full_idx=1, chunk_size=16,
                        compute_dtype="float32", attention_impl=attention_impl)
    config.optimizer.peak_lr = 3e-3
    config.optimizer.warmup_steps = 2
    config.update(top_level)
    return config


def read_metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


class RecordingIterator:
    """Wraps the real train iterator: records every batch handed out; optionally sends SIGTERM while handing out
    batch number `sigterm_at` (1-based), i.e. during that optimizer step."""

    def __init__(self, inner, log, sigterm_at=None):
        self.inner, self.log, self.sigterm_at = inner, log, sigterm_at

    def __next__(self):
        batch = next(self.inner)
        self.log.append(batch["inputs"].copy())
        if len(self.log) == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


REAL_TRAIN_ITERATOR = data.build_train_iterator


def record_batches(monkeypatch, log, sigterm_at=None):
    def recording(*args, **kwargs):
        return RecordingIterator(REAL_TRAIN_ITERATOR(*args, **kwargs), log, sigterm_at)

    monkeypatch.setattr(data, "build_train_iterator", recording)


def test_default_config_learns(tmp_path):
    config = tiny_config(tmp_path, attention_impl="auto", total_steps=50, log_every=5, eval_every=50, eval_batches=2,
                         diagnostic_every=50, diagnostic_tokens=64, checkpoint_every=50)
    summary = train(config)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(5, 51, 5))
    for field in ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"):
        assert all(np.isfinite(m[field]) for m in metrics), field
    assert metrics[0]["loss"] > 4.0  # ~ln(384) at the start
    assert np.mean([m["loss"] for m in metrics[-3:]]) < metrics[0]["loss"] - 1.5
    assert metrics[-1]["eval_loss"] < 4.0
    shares = metrics[-1]["long_term_share"]
    assert len(shares) == 2 and all(0.0 < s < 1.0 for s in shares)
    assert summary["final_step"] == 50 and summary["mfu"] == 0.0  # CPU: peak unknown, MFU reported as 0
    assert Checkpointer(str(tmp_path), keep=1, async_save=False).latest_step() == 50


def test_preempted_run_resumes_to_the_same_losses_and_data(tmp_path, monkeypatch):
    straight_batches, resumed_batches = [], []
    record_batches(monkeypatch, straight_batches)
    train(tiny_config(tmp_path / "straight"))
    straight = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "straight")}

    record_batches(monkeypatch, resumed_batches, sigterm_at=3)
    summary = train(tiny_config(tmp_path / "resumed"))
    assert summary["preempted"] and summary["final_step"] == 3
    record_batches(monkeypatch, resumed_batches)
    summary = train(tiny_config(tmp_path / "resumed"))
    assert summary["final_step"] == 6 and summary["steps_run"] == 3
    resumed = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "resumed")}

    assert sorted(resumed) == sorted(straight) == list(range(1, 7))
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [straight[s] for s in range(1, 7)], rtol=1e-5)
    np.testing.assert_array_equal(np.stack(resumed_batches), np.stack(straight_batches))


def test_nan_stops_without_saving_and_half_written_checkpoints_are_ignored(tmp_path, monkeypatch):
    real_step = step_module.make_train_step

    def step_that_diverges_at_step_4(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def diverging(state, batch):
            new_state, metrics = step(state, batch)
            poison = jnp.where(state["step"] >= 3, jnp.nan, 0.0)
            new_state["params"] = jax.tree.map(lambda p: p + poison, new_state["params"])
            return new_state, {**metrics, "loss": metrics["loss"] + poison}

        return diverging

    monkeypatch.setattr(step_module, "make_train_step", step_that_diverges_at_step_4)
    config = tiny_config(tmp_path, checkpoint_every=2, total_steps=8)
    with pytest.raises(NonFiniteLossError, match="step 4: loss=nan"):
        train(config)
    checkpoints = Checkpointer(str(tmp_path), keep=3, async_save=False)
    assert checkpoints.latest_step() == 2
    assert max(m["step"] for m in read_metrics(tmp_path)) == 3  # the NaN step was never logged as good

    # A save that died half-way leaves only orbax's temporary directory: resume must not pick it up.
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234567").mkdir()
    assert Checkpointer(str(tmp_path), keep=3, async_save=False).latest_step() == 2
    monkeypatch.setattr(step_module, "make_train_step", real_step)
    summary = train(tiny_config(tmp_path, checkpoint_every=2, total_steps=4))
    assert summary["steps_run"] == 2 and np.isfinite(summary["final_loss"])


@pytest.mark.parametrize("override, named", [
    ("--config.model.no_such_key=1", "model.no_such_key"),
    ("--config.model.remat=sometimes", "model.remat"),
    ("--config.model.windows=(8,)", "model.windows"),
    ("--config.mesh.data=3", "mesh.data"),
    ("--config.optimizer.peak_lr=fast", "optimizer.peak_lr"),
])
def test_config_errors_exit_2_naming_the_key(override, named, tmp_path, capsys):
    code = train_cli.main(["--config", str(REPO / "configs" / "default.py"), f"--config.workdir={tmp_path}",
                           override])
    assert code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_sigterm_to_the_cli_saves_and_exits_0(tmp_path):
    overrides = [f"--config.workdir={tmp_path}", "--config.total_steps=1000", "--config.log_every=1",
                 "--config.checkpoint_every=0", "--config.eval_every=0", "--config.diagnostic_every=0",
                 "--config.seq_len=32", "--config.global_batch_size=2", "--config.model.num_layers=1",
                 "--config.model.block_size=0", "--config.model.attention_impl=naive", "--config.progress_bar=false"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    command = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "default.py"), *overrides]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1].decode()[-2000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()[-2000:]
    saved = Checkpointer(str(tmp_path), keep=3, async_save=False).latest_step()
    assert saved is not None and saved == max(m["step"] for m in read_metrics(tmp_path)) < 1000
