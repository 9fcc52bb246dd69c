"""AdamW with global-norm clipping and a linear-warmup + cosine learning-rate schedule (NHA_SPEC section 5)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
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


def frozen_mask(params, patterns) -> object:
    """True for every parameter whose path (e.g. "blocks/3/mlp/up/kernel") re.search-matches one of `patterns`;
    same tree as params."""
    def is_frozen(path, _):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return any(re.search(pattern, name) for pattern in patterns)
    return jax.tree_util.tree_map_with_path(is_frozen, params)


def zero_frozen(patterns) -> optax.GradientTransformation:
    """Sets the gradients / updates of the parameters matching `patterns` to zero (stateless)."""
    def update(updates, state, params=None):
        del params
        mask = frozen_mask(updates, patterns)
        return jax.tree.map(lambda u, frozen: jnp.zeros_like(u) if frozen else u, updates, mask), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(opt_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) then AdamW(b1, b2, eps, weight_decay) on the schedule above.

    optimizer.frozen (regexes over parameter paths, e.g. ("/mlp/",) to freeze every FFN as in NHA_SPEC section 5)
    zeroes the matching gradients before clipping (the norm counts only trained parameters) and their updates
    after AdamW (so weight decay does not move them either): frozen parameters stay bitwise unchanged. Their Adam
    moments stay allocated (at zero), which keeps the optimizer state's tree, and its shardings, the same.
    """
    adamw = optax.chain(
        optax.clip_by_global_norm(opt_cfg.clip_norm),
        optax.adamw(learning_rate_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                    weight_decay=opt_cfg.weight_decay, mask=weight_decay_mask))
    patterns = tuple(opt_cfg.get("frozen", ()))
    if not patterns:
        return adamw
    return optax.chain(zero_frozen(patterns), adamw, zero_frozen(patterns))
