"""Model FLOPs, MFU, and the run's outputs: metrics.jsonl, tensorboardX scalars and a progress bar.

The FLOP count (docs/TRAINING.md has the derivation):
  train FLOPs per token = 6 * N_matmul + 3 * sum over layers of attention_forward_flops(layer)
  N_matmul = every weight matrix used in a matmul: q, k, v, gate, o projections, the three MLP matrices and the
             LM head; not the embedding table (a lookup) nor the norm scales.
  attention_forward_flops = 2 * H * (dk + dv) * (m + mean_window)   slot and window logits, slot and window reads
                          + 3 * Hkv * m * (dk + dv)                 the slot-state update (decay, scale, add)
  mean_window = the mean over t < T of min(t + 1, W): causal, so a full layer counts (T + 1) / 2, not T.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import ml_collections
import tensorboardX
import tqdm

# Dense bf16 peak FLOP/s per device, matched against jax's device_kind (first match wins).
PEAK_FLOPS_BY_DEVICE_KIND = (
    ("H100", 989e12),
    ("H200", 989e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6", 918e12),
)


def peak_flops_per_device(device: jax.Device) -> float | None:
    """Peak dense bf16 FLOP/s of `device`, or None when unknown (CPU, unlisted GPUs): then MFU is reported as 0."""
    for kind, flops in PEAK_FLOPS_BY_DEVICE_KIND:
        if kind.lower() in device.device_kind.lower():
            return flops
    return None


def mean_window(window: int, seq_len: int) -> float:
    """Mean over t in [0, seq_len) of min(t + 1, window): the average number of window keys per query."""
    w = min(window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def attention_forward_flops(model_cfg: ml_collections.ConfigDict, window: int, seq_len: int) -> float:
    """Forward FLOPs per token of one NHA layer's attention core (excluding the projections)."""
    heads, kv_heads, m = model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.num_slots
    width = model_cfg.head_dim + model_cfg.v_head_dim
    return 2 * heads * width * (m + mean_window(window, seq_len)) + 3 * kv_heads * m * width


def matmul_param_count(params) -> int:
    """Elements of every 2-D parameter except the embedding table (top-level 'embed')."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(int(leaf.size) for path, leaf in flat
               if len(leaf.shape) == 2 and getattr(path[0], "key", None) != "embed")


def train_flops_per_token(params, model_cfg: ml_collections.ConfigDict, windows, seq_len: int) -> float:
    """6 * N_matmul + 3 * sum_l attention_forward_flops: forward plus a backward that costs twice the forward."""
    attention = sum(attention_forward_flops(model_cfg, w, seq_len) for w in windows)
    return 6 * matmul_param_count(params) + 3 * attention


class MetricsWriter:
    """Appends one JSON object per logged step to <workdir>/metrics.jsonl and mirrors scalars to tensorboardX.

    Only process 0 writes; other hosts get a writer that does nothing.
    """

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        if enabled:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(workdir) / "metrics.jsonl", "a", encoding="utf-8")
            self.tensorboard = tensorboardX.SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        """metrics: name -> float (or list of floats, logged per index to tensorboard)."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for name, value in metrics.items():
            if isinstance(value, list):  # per-layer diagnostics
                for layer, item in enumerate(value):
                    self._scalar(f"{name}/layer_{layer}", item, step)
            else:
                self._scalar(name, value, step)

    def _scalar(self, tag: str, value, step: int) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            self.tensorboard.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


class Throughput:
    """Tokens per second and MFU over the steps since the last call to `measure`."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops_total: float | None, step: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops_total = peak_flops_total
        self.last_step, self.last_time = step, time.perf_counter()

    def measure(self, step: int) -> tuple[float, float]:
        """Call after the device finished `step`; returns (tokens_per_sec, mfu), mfu = 0 when the peak is unknown."""
        now = time.perf_counter()
        tokens_per_sec = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        mfu = tokens_per_sec * self.flops_per_token / self.peak_flops_total if self.peak_flops_total else 0.0
        return tokens_per_sec, mfu


def progress_bar(total_steps: int, start_step: int, enabled: bool) -> tqdm.tqdm:
    """A tqdm bar over optimizer steps (ETA included); disabled on non-zero hosts or by config."""
    return tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not enabled,
                     dynamic_ncols=True)
