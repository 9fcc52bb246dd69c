"""Which Hugging Face tensor is which nha-jax parameter, and the new NHA gate's initialisation.

nha-jax parameters are named by their path in the model's nnx.State ("blocks/3/attn/q_proj/kernel"). Linear
kernels are [d_in, d_out]; Hugging Face weights are [d_out, d_in], so those are transposed (exactly).
"""
from __future__ import annotations

import ml_collections
import numpy as np

# (nha-jax name inside a block, Hugging Face name inside model.layers.{l}, transposed)
_BLOCK_TENSORS = (
    ("attn_norm/scale", "input_layernorm.weight", False),
    ("mlp_norm/scale", "post_attention_layernorm.weight", False),
    ("attn/q_proj/kernel", "self_attn.q_proj.weight", True),
    ("attn/k_proj/kernel", "self_attn.k_proj.weight", True),
    ("attn/v_proj/kernel", "self_attn.v_proj.weight", True),
    ("attn/o_proj/kernel", "self_attn.o_proj.weight", True),
    ("mlp/gate/kernel", "mlp.gate_proj.weight", True),
    ("mlp/up/kernel", "mlp.up_proj.weight", True),
    ("mlp/down/kernel", "mlp.down_proj.weight", True),
)
_BIAS_TENSORS = (
    ("attn/q_proj/bias", "self_attn.q_proj.bias", False),
    ("attn/k_proj/bias", "self_attn.k_proj.bias", False),
    ("attn/v_proj/bias", "self_attn.v_proj.bias", False),
)


def tensor_table(model_cfg: ml_collections.ConfigDict) -> list[tuple[str, str, bool]]:
    """(nha-jax name, Hugging Face name, transposed) for every parameter the host Transformer has.

    The NHA gates (blocks/{l}/attn/gate_proj/kernel) are not in it: a Hugging Face model has none.
    """
    table = [("embed", "model.embed_tokens.weight", False), ("final_norm/scale", "model.norm.weight", False)]
    if not model_cfg.tie_embeddings:
        table.append(("head", "lm_head.weight", True))
    block_tensors = _BLOCK_TENSORS + (_BIAS_TENSORS if model_cfg.qkv_bias else ())
    for layer in range(model_cfg.num_layers):
        table += [(f"blocks/{layer}/{ours}", f"model.layers.{layer}.{theirs}", transposed)
                  for ours, theirs, transposed in block_tensors]
    return table


def gate_name(layer: int) -> str:
    """The nha-jax name of layer `layer`'s gate projection (D -> Hkv * m)."""
    return f"blocks/{layer}/attn/gate_proj/kernel"


def gate_from_k_proj(k_kernel: np.ndarray, *, num_kv_heads: int, head_dim: int, num_slots: int) -> np.ndarray:
    """The gate projection initialised from k_proj rows (NHA_SPEC section 5).

    Slot i of kv head h gets the key projection's row (output feature) i mod head_dim of the same head, so each
    slot's gate starts out reading the same directions its head's keys do.
    k_kernel [D, Hkv * dk] (nha-jax layout) -> [D, Hkv * m].
    """
    d_model = k_kernel.shape[0]
    per_head = k_kernel.reshape(d_model, num_kv_heads, head_dim)
    rows = np.arange(num_slots) % head_dim
    return np.ascontiguousarray(per_head[:, :, rows].reshape(d_model, num_kv_heads * num_slots))
