"""Packed documents: turning user segment ids into run ids and per-document positions."""
import jax
import jax.numpy as jnp


def runs_and_positions(segment_ids, continues, start_position):
    """Numbers the contiguous runs of equal segment ids and restarts positions in each run.

    A run is a maximal stretch of equal ids, so two documents that happen to share an id but are not adjacent never
    see each other. Run 0 is reserved for the run that continues a carried-in state: the first run gets id 0 when
    `continues`, else 1 (and then no token has run 0).

    Args:
      segment_ids: int [B, T].
      continues: bool [B], whether the first run continues the carried-in state.
      start_position: int [B], the position of the first token when it continues the state.
    Returns:
      runs int32 [B, T] (non-decreasing along T), positions int32 [B, T].
    """
    _, T = segment_ids.shape
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    runs = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - jnp.where(continues, 1, 0)[:, None].astype(jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)
    run_start = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    positions = t - run_start + jnp.where(runs == 0, start_position[:, None], 0)
    return runs, positions.astype(jnp.int32)
