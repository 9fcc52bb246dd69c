"""Block sizes, warps and pipeline stages of the GPU NHA kernels, per shape class (a table in code, never searched).

The table is keyed by the largest padded head dimension, the only size that moves the register budget of the
kernels much (the slot states H^k [dk, m] and H^v [m, dv] and the output tile live in registers).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of pallas_kernels.triton.

    chunk: tokens per query block of the output kernel and per step of the slot-state kernel (a power of two >= 16).
    sub_block: rows the output kernel handles at once inside a chunk (its [sub, sub, m] pair block lives in
      registers); key_block: keys per step of the window loop. Both powers of two >= 16, capped at chunk.
    output_warps / output_stages: num_warps / num_stages of the output kernel (grid B x H x T/chunk).
    state_warps / state_stages: the same for the slot-state kernel (grid B x Hkv, sequential over chunks).
    """

    chunk: int
    sub_block: int
    key_block: int
    output_warps: int
    output_stages: int
    state_warps: int
    state_stages: int


# Keyed by max(padded dk, padded dv); the first row whose bound is >= the key wins.
_TABLE: tuple[tuple[int, TritonConfig], ...] = (
    (64, TritonConfig(chunk=64, sub_block=16, key_block=32, output_warps=4, output_stages=2, state_warps=4, state_stages=2)),
    (128, TritonConfig(chunk=64, sub_block=16, key_block=32, output_warps=8, output_stages=2, state_warps=8, state_stages=2)),
    (1 << 30, TritonConfig(chunk=32, sub_block=16, key_block=32, output_warps=8, output_stages=1, state_warps=8, state_stages=1)),
)


def triton_config(head_dim: int) -> TritonConfig:
    """Return the launch parameters for kernels whose largest padded head dimension is `head_dim`."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    return next(config for bound, config in _TABLE if head_dim <= bound)
