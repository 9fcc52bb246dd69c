"""The NHA operator: one dispatch (nha_attention), its reference forms, the chunked XLA path, and the decode cache."""
from nha_jax.ops.attention import IMPLS, nha_attention, prefill
from nha_jax.ops.decode import NHAState, decode_step, init_state

__all__ = ["IMPLS", "NHAState", "decode_step", "init_state", "nha_attention", "prefill"]
