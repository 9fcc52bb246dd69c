"""The NHA language model (Flax NNX): embeddings, pre-norm blocks with a per-layer window schedule, untied head.

Baselines come from the same code by config (NHA_SPEC section 1):
  Transformer++  num_slots = 0, every window full;      GSA       window = 0 everywhere;
  sliding window num_slots = 0, small windows;          NHA       paper schedule (block_size / full_idx) or a list.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nha_jax.layers import (NHAAttention, RMSNorm, SwiGLU, llama3_rope_frequencies, logical_param, logits_matmul,
                            long_term_share, mlp_hidden_size)
from nha_jax.sharding import constrain
from pallas_kernels import RESIDUALS_NAME

COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}

# Remat policies by config name; None means no rematerialisation (keep every activation). "dots_and_attention"
# also keeps what every attention kernel's backward needs from its forward, so the backward pass does not run the
# forward kernels again: the NHA kernels' output, softmax statistics and chunk states (tagged RESIDUALS_NAME; about
# 100 MB per layer at NHA-340M's 8 x 2048 tokens), and the output and softmax statistics of cuDNN's flash attention
# (the full-window layers and Transformer++), whose forward is the primitive below.
_CUDNN_ATTENTION_FORWARD = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd")
_policies = jax.checkpoint_policies


def _cudnn_attention_forward_saveable(prim, *_, **__) -> bool:
    return prim.name in _CUDNN_ATTENTION_FORWARD


REMAT_POLICIES = {
    "none": None,
    "full": _policies.nothing_saveable,
    "dots_saveable": _policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": _policies.dots_with_no_batch_dims_saveable,
    "dots_and_attention": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable,
        _policies.save_from_both_policies(_policies.save_only_these_names(RESIDUALS_NAME),
                                          _cudnn_attention_forward_saveable)),
}


# The LLM-variant keys (a converted Hugging Face model, nha_jax.convert); these defaults are the NHA of NHA_SPEC
# section 1, so configs written before the keys existed build the same model.
LLM_VARIANT_DEFAULTS = {"value_silu": True, "output_norm": True, "qkv_bias": False, "norm_eps": 1e-6,
                        "tie_embeddings": False}


def variant_option(model_cfg: ml_collections.ConfigDict, key: str):
    """model_cfg[key], or its LLM_VARIANT_DEFAULTS value when the config predates the key."""
    return model_cfg.get(key, LLM_VARIANT_DEFAULTS[key])


def rope_frequencies(model_cfg: ml_collections.ConfigDict) -> tuple[float, ...] | None:
    """Inverse RoPE frequencies when model.rope_scaling.kind is "llama3", else None (plain RoPE of rope_theta)."""
    scaling = model_cfg.get("rope_scaling", None)
    if scaling is None or scaling.kind == "none":
        return None
    if scaling.kind != "llama3":
        raise ValueError(f"model.rope_scaling.kind={scaling.kind!r} is not supported; use 'none' or 'llama3'.")
    return llama3_rope_frequencies(model_cfg.head_dim, model_cfg.rope_theta, factor=scaling.factor,
                                   low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                                   original_max_position=scaling.original_max_position)


def layer_windows(model_cfg: ml_collections.ConfigDict, seq_len: int) -> list[int]:
    """Per-layer window sizes.

    Either the explicit list `model.windows`, or the paper schedule: layer l is full (window = seq_len) when
    l % model.block_size == model.full_idx, otherwise model.window. block_size = 0 means no full layers.
    """
    num_layers = model_cfg.num_layers
    if model_cfg.windows:
        windows = [int(w) for w in model_cfg.windows]
        if len(windows) != num_layers:
            raise ValueError(f"model.windows has {len(windows)} entries but model.num_layers={num_layers}; "
                             "give one window per layer, or set model.windows=() to use the block schedule.")
    else:
        block = model_cfg.block_size
        windows = [seq_len if block and layer % block == model_cfg.full_idx else model_cfg.window
                   for layer in range(num_layers)]
    if any(w < 0 for w in windows):
        raise ValueError(f"model.windows / model.window must be >= 0, got {windows}.")
    return windows


def schedule_period(windows: list[int] | tuple[int, ...]) -> int:
    """The smallest p dividing len(windows) with windows[l] == windows[l % p]: the layers scan in groups of p."""
    num_layers = len(windows)
    return next(p for p in range(1, num_layers + 1)
                if num_layers % p == 0 and all(w == windows[i % p] for i, w in enumerate(windows)))


class Block(nnx.Module):
    """h += NHA(RMSNorm(h)); h += SwiGLU(RMSNorm(h))."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, window: int, *, rngs: nnx.Rngs):
        dtype = COMPUTE_DTYPES[model_cfg.compute_dtype]
        width, std = model_cfg.d_model, model_cfg.init_std
        eps = variant_option(model_cfg, "norm_eps")
        self.attn_norm = RMSNorm(width, eps=eps)
        self.attn = NHAAttention(
            width, num_heads=model_cfg.num_heads, num_kv_heads=model_cfg.num_kv_heads, head_dim=model_cfg.head_dim,
            v_head_dim=model_cfg.v_head_dim, num_slots=model_cfg.num_slots, window=window,
            gate_temperature=model_cfg.gate_temperature, rope_theta=model_cfg.rope_theta,
            impl=model_cfg.attention_impl, chunk_size=model_cfg.chunk_size, dtype=dtype, init_std=std, rngs=rngs,
            value_silu=variant_option(model_cfg, "value_silu"), output_norm=variant_option(model_cfg, "output_norm"),
            qkv_bias=variant_option(model_cfg, "qkv_bias"), norm_eps=eps, rope_frequencies=rope_frequencies(model_cfg))
        self.mlp_norm = RMSNorm(width, eps=eps)
        hidden = model_cfg.mlp_hidden or mlp_hidden_size(width)
        self.mlp = SwiGLU(width, hidden, dtype=dtype, init_std=std, rngs=rngs)

    def __call__(self, h: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """h [B, T, D] -> [B, T, D]."""
        h = h + self.attn(self.attn_norm(h), segment_ids)
        h = constrain(h, ("batch", "seq", "act_embed"))
        h = h + self.mlp(self.mlp_norm(h))
        return constrain(h, ("batch", "seq", "act_embed"))


class LanguageModel(nnx.Module):
    """Decoder-only LM. __call__(tokens [B,T] int, segment_ids [B,T] int | None) -> logits [B,T,V] float32.

    model.tie_embeddings=True reads logits off the embedding table (head = embed^T) and has no head parameter.
    """

    def __init__(self, model_cfg: ml_collections.ConfigDict, *, seq_len: int, rngs: nnx.Rngs):
        self.windows = tuple(layer_windows(model_cfg, seq_len))
        # scan_layers: the layers run as a lax.scan over groups of one schedule period (docs/TRAINING.md).
        self.scan_period = schedule_period(self.windows) if model_cfg.get("scan_layers", False) else len(self.windows)
        self.dtype = COMPUTE_DTYPES[model_cfg.compute_dtype]
        self.remat_policy = model_cfg.remat
        width, vocab = model_cfg.d_model, model_cfg.vocab_size
        self.embed = logical_param(rngs, (vocab, width), ("vocab", "embed"), model_cfg.init_std)
        self.blocks = nnx.List([Block(model_cfg, window, rngs=rngs) for window in self.windows])
        self.final_norm = RMSNorm(width, eps=variant_option(model_cfg, "norm_eps"))
        self.head = (None if variant_option(model_cfg, "tie_embeddings")
                     else logical_param(rngs, (width, vocab), ("embed", "vocab"), model_cfg.init_std))

    def hidden_states(self, tokens: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """tokens [B, T] -> final-normed hidden states [B, T, D] in the compute dtype."""
        h = constrain(self.embed[...].astype(self.dtype)[tokens], ("batch", "seq", "act_embed"))
        run_block = Block.__call__
        if self.remat_policy != "none":
            run_block = nnx.remat(Block.__call__, policy=REMAT_POLICIES[self.remat_policy])
        period, groups = self.scan_period, len(self.blocks) // self.scan_period
        if groups == 1:
            for block in self.blocks:
                h = run_block(block, h, segment_ids)
            return self.final_norm(h)

        # Layer p of every group has the same structure (same window); stack their parameters along a new leading
        # axis and scan. Parameters stay stored per layer (checkpoints, conversion and sharding rules see the
        # unrolled model); the stack is a copy inside the step, small next to the activations.
        graphdefs = [nnx.graphdef(self.blocks[p]) for p in range(period)]
        stacked = [jax.tree.map(lambda *layers: jnp.stack(layers),
                                *[nnx.state(self.blocks[g * period + p]) for g in range(groups)])
                   for p in range(period)]

        def run_group(h, group_states):
            for graphdef, state in zip(graphdefs, group_states):
                h = run_block(nnx.merge(graphdef, state), h, segment_ids)
            return h, None

        h, _ = jax.lax.scan(run_group, h, stacked)
        return self.final_norm(h)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens [B, T] int, segment_ids [B, T] int (None = one document per row) -> logits [B, T, V] float32."""
        return constrain(self.logits(self.hidden_states(tokens, segment_ids)), ("batch", "seq", "act_vocab"))

    def logits(self, h: jax.Array) -> jax.Array:
        """Final-normed hidden states [..., D] -> logits [..., V] float32 (the head, or embed^T when tied)."""
        head = self.embed[...].T if self.head is None else self.head[...]
        return logits_matmul(h, head.astype(self.dtype))

    def long_term_shares(self, tokens: jax.Array) -> jax.Array:
        """Mean slot share of attention mass per layer for one document: tokens [T] int -> [num_layers] float32.

        Runs the blocks on the document and probes each layer's softmax with layers.long_term_share (dense in T:
        meant for a few hundred tokens, outside the train step).
        """
        h = self.embed[...].astype(self.dtype)[tokens[None]]
        shares = []
        for block in self.blocks:
            q, k, _, log_alpha = block.attn.project(block.attn_norm(h))
            share = long_term_share(q[0], k[0], log_alpha[0], window=block.attn.window,
                                    rope_theta=block.attn.rope_theta)
            shares.append(jnp.mean(share))
            h = block(h, None)
        return jnp.stack(shares)
