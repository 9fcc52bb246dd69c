"""AdamW with global-norm clipping and a linear-warmup + cosine learning-rate schedule (NHA_SPEC section 5)."""
from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(opt_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """0 -> peak_lr linearly over warmup_steps, then cosine down to end_lr_ratio * peak_lr at total_steps."""
    peak = opt_cfg.peak_lr
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=opt_cfg.warmup_steps,
        decay_steps=max(total_steps, opt_cfg.warmup_steps + 1), end_value=peak * opt_cfg.end_lr_ratio)


def weight_decay_mask(params):
    """Decay only matrices (projections, embedding, head); norm scales (1-D) are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(opt_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) then AdamW(b1, b2, eps, weight_decay) on the schedule above."""
    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.clip_norm),
        optax.adamw(learning_rate_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                    weight_decay=opt_cfg.weight_decay, mask=weight_decay_mask))
