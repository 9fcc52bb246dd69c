"""Hugging Face config.json <-> nha-jax model config, for the architectures the converter supports.

Supported: Llama (Llama-2/3 style: GQA, no biases, optional "llama3" RoPE scaling) and Qwen2 (biases on q/k/v).
Anything else is rejected by name before a single tensor is read.
"""
from __future__ import annotations

import ml_collections

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's config.json describes a model the converter cannot represent exactly."""


def _rope_parameters(hf_config: dict) -> dict:
    """The RoPE settings of both config.json layouts: transformers >= 5 ("rope_parameters") and the older
    top-level "rope_theta" + "rope_scaling" of the published Llama-3 / Qwen2 checkpoints."""
    if hf_config.get("rope_parameters"):
        return dict(hf_config["rope_parameters"])
    params = dict(hf_config.get("rope_scaling") or {})
    params["rope_theta"] = hf_config.get("rope_theta", 10000.0)
    return params


def _reject(condition: bool, message: str) -> None:
    if condition:
        raise UnsupportedArchitectureError(message)


def check_supported(hf_config: dict) -> str:
    """Raises UnsupportedArchitectureError naming the first unsupported feature; returns the model_type."""
    model_type = hf_config.get("model_type")
    _reject(model_type not in SUPPORTED_MODEL_TYPES,
            f"model_type={model_type!r} (architectures={hf_config.get('architectures')}) is not supported; the "
            f"converter handles {SUPPORTED_MODEL_TYPES}.")
    _reject(hf_config.get("hidden_act", "silu") != "silu",
            f"hidden_act={hf_config.get('hidden_act')!r} is not supported; the NHA MLP is SwiGLU (silu).")
    _reject(bool(hf_config.get("attention_bias")), "attention_bias=true (biases on q/k/v/o) is not supported.")
    _reject(bool(hf_config.get("mlp_bias")), "mlp_bias=true is not supported; the NHA MLP has no biases.")
    _reject(bool(hf_config.get("use_sliding_window")), "use_sliding_window=true is not supported; convert the "
            "full-attention model and choose NHA windows instead.")
    rope_type = _rope_parameters(hf_config).get("rope_type", _rope_parameters(hf_config).get("type", "default"))
    _reject(rope_type not in ("default", "llama3"),
            f"rope_type={rope_type!r} is not supported; only plain RoPE and Llama-3 'llama3' scaling are.")
    return model_type


def model_config_from_hf(hf_config: dict, *, num_slots: int, window: int, block_size: int, full_idx: int,
                         compute_dtype: str = "bfloat16") -> ml_collections.ConfigDict:
    """The nha-jax `config.model` for a Hugging Face config, as the LLM variant (NHA_SPEC section 5).

    Layer l keeps a full window when l % block_size == full_idx (block_size = 1: every layer full); the others get
    `window` tokens and `num_slots` slots. num_slots = 0 with every layer full is exactly the host Transformer.
    """
    model_type = check_supported(hf_config)
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    rope = _rope_parameters(hf_config)
    scaling_kind = "llama3" if rope.get("rope_type", rope.get("type")) == "llama3" else "none"
    scaling = ml_collections.ConfigDict(dict(
        kind=scaling_kind, factor=float(rope.get("factor", 8.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position=int(rope.get("original_max_position_embeddings", 8192))))
    return ml_collections.ConfigDict(dict(
        vocab_size=hf_config["vocab_size"], d_model=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads, head_dim=head_dim, v_head_dim=head_dim,
        mlp_hidden=hf_config["intermediate_size"], num_slots=num_slots, window=window, block_size=block_size,
        full_idx=full_idx, windows=(), gate_temperature=8.0, rope_theta=float(rope["rope_theta"]), init_std=0.02,
        attention_impl="auto", chunk_size=64, compute_dtype=compute_dtype, remat="none",
        value_silu=False, output_norm=False, qkv_bias=model_type == "qwen2",
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)), rope_scaling=scaling))


def checkpoint_dtype(hf_config: dict) -> str:
    """The dtype the checkpoint was saved in ("bfloat16", "float32", ...), float32 when config.json does not say."""
    return hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
