"""Block sizes, warps and pipeline stages of the GPU NHA kernels, per shape class (a table in code, never searched).

Shape classes: the largest padded head dimension (it sets the register budget: the slot states H^k [dk, m] and
H^v [m, dv] live in registers, and so does the [sub, sub, m] pair block of a sub-block whose gates are too strong for
the factored matmul form), and whether the (batch, kv head) pairs alone fill the GPU (the slot-state kernel is
sequential over chunks inside a program). Measured on one H100, jax 0.11.2 (bench/NOTES_kernels.md):
- dk = dv = 128, H = Hkv = 16, m = 64, W = 64, B = 8, T = 2048 (2026-11-27, factored pairs): chunk 32 with one
  32-row sub-block per program beat chunk 16 (kernels 7.2 vs 8.3 ms fwd+bwd) and chunk 32 in two 16-row sub-blocks
  (the in-chunk state carry doubles the state backward); chunk 64 with 32-row sub-blocks asks for 270 KB of shared
  memory (232 KB available).
- dk = dv = 64, H = 16, Hkv = 4, m = 64, W = 32 (NHA-340M's layers, same date): chunk 16 with 4 warps beat chunk 32
  (4.5 vs 5.7 ms), 32-row sub-blocks (9.8 ms: the backward spills) and 8 warps (7.0 ms).
- Session 6 (2026-11-27, input-dtype chunk states, tf32 pair dots): 16 warps lost at both head dims (dk = 128
  output backward 4.3 vs 2.4 ms), and so did 8 warps at dk = 64 (1.5 vs 1.1 ms). The state backward with a whole
  GQA group per program: 0.68 vs 1.36 ms at NHA-340M's layer with B = 8 (128 programs), 1.95 vs 1.77 ms at B = 2,
  T = 8192 (32 programs): hence grouped_state_backward_programs = 128.
- Earlier, with elementwise pairs (2026-11-26): 8 warps beat 4 at dk = 128, stages hardly mattered, and splitting the
  state kernel 4 ways helped at B * Hkv = 16 (1.53 vs 2.34 ms) but not at 128 (0.65 vs 0.43 ms).
- Session 8 (2026-11-27, NHA-340M's layer): the output kernels with a GQA group's 4 query heads stacked per
  program (stacked_rows = 64 at 16-row sub-blocks) against one head per program: output 0.45 vs 0.85 ms, output
  backward 0.99 vs 1.29 ms; 2 heads 0.62 / 1.09; 4 heads with 8 warps 0.65 / 1.62. Chunk 32 with 32-row
  sub-blocks and 2 heads per program tied the table (kernels 2.94 vs 2.98 ms). Stacking at dk = 128 is not measured
  (the S1-S3 benchmark shapes have no GQA), so that row keeps one head per program.
- Session 9 (2026-11-27): the scan path's elementwise chunk scan with [16, 32] tiles and 16 chunks per loop step
  beat [16, 64] with 8 and 2 warps (within 5%; [16, 16] tied at B = 2, T = 8192). Shared factored-pair exps
  (removed) and key blocks of 16 lost 8-14% in the output backward. The window dq in its own kernel: at dk = 128
  the output backward fell 2.00 -> 1.57 ms for a 0.26 ms dq pass (S1 fwd+bwd 5.82 -> 5.62, S2 6.57 -> 6.44), at
  NHA-340M's layer 0.87 -> 0.83 ms for 0.05 (a wash), so only the dk = 128 row takes it.
- Session 10 (2026-11-27): the output kernels lost their per-pair-term lax.conds (a factored pass, then an
  elementwise pass over strong chunks only).
- Session 11 (2026-11-27, without the conds, dk = 128, B = 8, T = 2048): the output kernel at 4 warps 0.445 ms
  against 0.767 at 8; the window dk/dv and dq kernels at 4 warps 0.213 and 0.144 ms against 0.314 and 0.257, while
  the output backward stays at 8 (0.844 ms at 4 against 0.816); the window dq inside the output backward still loses
  (1.123 ms against 0.816 + 0.257). The state backward at 8 warps, 1 split: 0.75 ms against 1.33 at 4 warps and
  0.87 with 2 splits; with 8 splits the whole op went 3.8 -> 6.5 ms (S1) and 4.8 -> 6.1 ms (B = 2, T = 8192, where
  the table's 4 splits stay). Three state stages: state backward 0.70 against 0.75 ms at B = 8, T = 2048, not taken
  (not measured at B = 2). The XLA-scan state path at B = 2, T = 8192: 4.74 against 4.82 ms wall, 4.36 against 4.39
  ms of device time, a tie, so it stays with the sequential kernels there.
- Session 12 (2026-11-27, dk = 128): the state backward split into a sequential kernel that carries only dH and a
  parallel one over chunks. At B = 8, T = 2048 it is a tie (0.752 ms against 0.544 + 0.223); at B = 2, T = 8192,
  1.264 against 0.546 + 0.345 ms, with state_stages 3 (2 stages: 0.548 + 0.399). Three stages also helped the slot
  states there (0.480 -> 0.445) and tie at B = 8. The decay gradient <dH, H> in the sequential kernel instead of
  the parallel one: 0.731 against 0.767 ms at B = 8, 1.028 against 0.890 at B = 2 (not taken). Chunk 64 with
  32-row sub-blocks asks for 251 KB of shared memory (232 KB available), and with 1 stage loses in every kernel
  but the slot states (output backward 2.19 against 1.09 ms); with one 64-row sub-block the output kernel's
  compile does not finish.
- Session 13 (2026-11-27, NHA-340M's layer: dk = 64, H = 16, Hkv = 4, W = 32, B = 8, T = 2048, scan path; device
  ms of the whole op's fwd+bwd): the output backward was 0.857 of 1.858 ms. The window dq in its own kernel:
  1.862 -> 1.732 (output backward 0.858 -> 0.684; session 9 had found a wash); one stage for the window kernels:
  window dk/dv 0.149 -> 0.082. The output backward with 2 stacked heads per program instead of 4: 0.693 -> 0.521
  (0.525 with 1), but its per-program gradients then cost XLA 0.068 ms to sum over the group. Taking the 4 stacked
  heads in 4 passes of one head (backward_head_passes) instead: output backward 0.541, no group sums left, whole op
  1.529 ms (2 stacked heads: 1.661 in the same call; 4 heads in 2 passes of 2: 0.959 for the output backward).
  8 backward warps: output backward 1.493 ms. At dk = 128 one window stage loses (window dk/dv 0.184 -> 0.220) and
  three tie. XLA's merged matmul of the scan path's key and value contributions (it slices and transposes its
  output apart) against two separate ones: 1.661 -> 1.648 ms, not taken.
- Session 14 (2026-11-27): the chunk-contribution kernel (scan_contribution_kernel, now the default) against XLA's
  matmuls: NHA-340M's layer 1.531 -> 1.406 ms, dk = 128 at B = 1, T = 32768 8.271 -> 7.340 ms. Chunk 32 with
  32-row sub-blocks at NHA-340M's layer: 1.935 ms (the output backward doubles), not taken.
- Session 15 (2026-11-27): state_gates_ahead (the slot-state kernel's hand-over one loop step ahead) lost at
  S2, 0.567 -> 0.739 ms, and was removed; the scan path now also takes B = 2, T = 8192 at dk = 128 (S2: 3.744 ->
  3.497 ms of device time, `_SCAN_STATE_ELEMENTS`).
The dk > 128 row is not measured.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of pallas_kernels.triton.

    chunk: tokens per query block of the output kernel and per step of the slot-state kernel (a power of two >= 16).
    sub_block: rows the output kernels handle at once inside a chunk ([sub, sub] x [sub, m] dots for the pairs, or
      the [sub, sub, m] fallback block in registers); key_block: keys per step of the window loop. Both powers of
      two >= 16, capped at chunk.
    output_warps / output_stages: num_warps / num_stages of the output kernel (grid B x H x T/chunk).
    state_warps / state_stages: the same for the slot-state kernel (grid B x Hkv x state_splits, sequential over
      chunks), its reverse in the backward (the state-gradient kernel, grid B x H x state_splits) and the parallel
      state backward after it (grid B x H x chunks); state_splits: programs per (batch, head) of the two sequential
      kernels, each owning a slice of dk and dv (capped at dim / 16).
    backward_warps / backward_stages: the same for the parallel backward kernels (output backward, grid
      B x H x T/chunk; window dk/dv, grid B x H x T/key_block; window dq); window_warps replaces backward_warps
      for the window dk/dv and window dq kernels (fewer live tiles than the output backward).
    factored_pairs: compute the pair terms as matmuls with factored decays (pallas_kernels.triton._FactoredPairs),
      redoing in a second pass of the kernel the chunks whose gates do not allow it; False always takes the
      elementwise [sub, sub, m] block, in one pass.
    grouped_state_backward_programs: the state backward gives each program a whole GQA group (one kv head's
      state, its query heads' gradients summed in-kernel) when batch x kv heads x state_splits reaches this many
      programs; below it, one program per query head keeps the GPU busier (the chunks run in sequence inside a
      program).
    scan_states: compute every chunk's own contribution to the slot states at once (batched matmuls in XLA), then
      the states entering each chunk by an elementwise scan kernel over chunks (no dots in its dependent chain),
      instead of the sequential slot-state kernel and its reverse in the backward, whose chunk-after-chunk loops of
      small dots leave the GPU idle when batch x kv heads is small. Taken only with one sub-block per chunk
      (sub_block >= chunk).
    stacked_rows: the output kernels give each program S query heads of one GQA group, S the largest power of two
      dividing the group with S * sub_block <= stacked_rows: the kv head's keys, gates and states are loaded once
      for them, and their rows stack into [S * sub_block, d] tiles (sub_block or less: one head per program).
    scan_contribution_kernel: with scan_states, each chunk's own contribution to the slot states (and its
      gradient) comes from a Pallas kernel over (B, Hkv, chunks); False: from XLA's batched matmuls, which XLA
      merges over (ks | vs) and then slices and transposes apart.
    backward_head_passes: the output backward takes its S stacked heads in this many passes of S / passes heads
      (a power of two), adding up the kv head's gradients across them in registers: the live tiles of fewer heads,
      without per-program partial gradients left for XLA to sum over the GQA group.
    window_stages: num_stages of the window dk/dv and window dq kernels (None: backward_stages).
    separate_window_dq: compute the window branch's dq in a kernel of its own (grid as the output kernels) instead of
      inside the output backward, whose live float32 tiles then belong to the slot branch alone.
    scan_tile / scan_unroll / scan_warps: the tile of a slot state [dk, m] or [m, dv] per program of the
      elementwise chunk scan that scan_states runs (grid B x Hkv x tiles), chunks per step of its loop (half as many
      in its backward, which loads three tiles per chunk), and its num_warps.
    input_dtype_states: store the slot states entering each chunk (written by the forward, read by both output
      kernels and the state backward, kept for the backward) in the inputs' dtype instead of float32. The output
      kernels round them to that dtype before their dots either way; the state backward's decay gradient
      <dH, H> then sees the rounded state.
    """

    chunk: int
    sub_block: int
    key_block: int
    output_warps: int
    output_stages: int
    state_warps: int
    state_stages: int
    state_splits: int
    backward_warps: int
    backward_stages: int
    window_warps: int
    factored_pairs: bool = True
    grouped_state_backward_programs: int = 128
    scan_states: bool = False
    stacked_rows: int = 16
    input_dtype_states: bool = True
    separate_window_dq: bool = False
    window_stages: int | None = None
    backward_head_passes: int = 1
    scan_contribution_kernel: bool = True
    scan_tile: tuple[int, int] = (16, 32)
    scan_unroll: int = 16
    scan_warps: int = 4


# Keyed by max(padded dk, padded dv); the first row whose bound is >= the key wins.
_TABLE: tuple[tuple[int, TritonConfig], ...] = (
    (64, TritonConfig(chunk=16, sub_block=16, key_block=32, output_warps=4, output_stages=2,
                      state_warps=4, state_stages=2, state_splits=1,
                      backward_warps=4, backward_stages=2, window_warps=4, stacked_rows=64,
                      separate_window_dq=True, backward_head_passes=4, window_stages=1)),
    (128, TritonConfig(chunk=32, sub_block=32, key_block=32, output_warps=4, output_stages=2,
                       state_warps=8, state_stages=3, state_splits=1,
                       backward_warps=8, backward_stages=2, window_warps=4, separate_window_dq=True)),
    (1 << 30, TritonConfig(chunk=32, sub_block=16, key_block=32, output_warps=8, output_stages=1,
                           state_warps=8, state_stages=1, state_splits=1,
                           backward_warps=8, backward_stages=1, window_warps=8)),
)
# Below this many (batch, kv head) pairs the state kernel alone leaves most of an H100's 132 SMs idle.
_FEW_STATE_PROGRAMS = 64
_SPLITS_WHEN_FEW = 4
# Up to this many elements in one chunk's slot states summed over batch and kv heads (B * Hkv * m * (dk + dv)),
# the scan path (per-chunk contributions, elementwise scan kernel) beats the sequential state kernels. The
# kernels' time grows with the number of chunks (one dependent step of small dots per chunk), the scan's with the
# bytes of the per-chunk contributions it moves. H100, 2026-11-27, fwd+bwd of the whole op (session 9, XLA
# contributions): 65536 (B = 2, Hkv = 4, m = 64, dk = dv = 64, T = 8192): scan 2.56 vs 4.00 ms; 262144 (B = 8, same
# dims, T = 2048): 2.32 vs 2.46 ms; 262144 (B = 1, Hkv = 16, dk = dv = 128, T = 32768): 15.5 vs 16.4 ms. Session 15
# (v15, the contribution kernel; device time): 524288 (B = 2, Hkv = 16, dk = dv = 128, T = 8192) scan 3.497 vs
# 3.744 ms (wall 3.752 vs 4.122); 2097152 (B = 8, same dims, T = 2048) 3.608 vs 3.177 ms.
_SCAN_STATE_ELEMENTS = 1 << 19


def triton_config(head_dim: int, state_programs: int | None = None,
                  state_elements: int | None = None) -> TritonConfig:
    """Launch parameters for kernels whose largest padded head dimension is `head_dim`.

    state_programs: batch * kv heads, if known; when it is small the state kernel is split over dk and dv.
    state_elements: batch * kv heads * m * (dk + dv), if known; when it is small the slot states come from the XLA
    scan (TritonConfig.scan_states).
    """
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    config = next(config for bound, config in _TABLE if head_dim <= bound)
    if state_programs is not None and state_programs < _FEW_STATE_PROGRAMS:
        config = dataclasses.replace(config, state_splits=_SPLITS_WHEN_FEW)
    if state_elements is not None and state_elements <= _SCAN_STATE_ELEMENTS:
        config = dataclasses.replace(config, scan_states=True)
    return config
