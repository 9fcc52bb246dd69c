"""Shared test helpers: random operator inputs, error measures, a persistent compilation cache."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np


def random_inputs(seed, B, T, H, Hkv, dk, dv, m, dtype=jnp.float32, gate_scale=3.0):
    """Random q, k, v, log_alpha with gates spread from ~0 (keep) to strongly negative (forget)."""
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (B, T, H, dk), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, Hkv, dk), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, Hkv, dv), jnp.float32).astype(dtype)
    log_alpha = jax.nn.log_sigmoid(gate_scale * jax.random.normal(kg, (B, T, Hkv, m), jnp.float32) + 1.0) / 2.0
    return q, k, v, log_alpha


def random_segments(seed, B, T, n_docs=3):
    """Packed-document ids [B, T]: row 0 has up to n_docs documents at random cut points, row 1 is one document."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, T), size=min(n_docs - 1, T - 1), replace=False)) if T > 1 else []
    row0 = np.zeros(T, np.int32)
    for c in cuts:
        row0[c:] += 1
    rows = [row0 + 1] + [np.full(T, 7, np.int32)] * (B - 1)
    return jnp.asarray(np.stack(rows))


def max_rel_err(x, ref):
    """max |x - ref| / max |ref|, in float64."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def rel_l2(x, ref):
    """||x - ref|| / ||ref||, in float64."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def jitted_nha():
    """nha_attention under one jax.jit (eager calls would compile op by op)."""
    from nha_jax.ops import nha_attention
    return jax.jit(nha_attention, static_argnames=("window", "scale", "rope_theta", "return_state", "impl",
                                                    "chunk_size"))


@contextlib.contextmanager
def persistent_compilation_cache(directory):
    """Within the block, every compiled program is cached in `directory`: runs that stop and resume, or repeat a
    run in process, compile the same programs again and find them there."""
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", previous[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


def kernel_name(eqn):
    """A pallas_call equation's kernel name (jax 0.10 keeps it as `name`, later versions in `name_and_src_info`)."""
    return str(eqn.params.get("name_and_src_info") or eqn.params.get("name")).split(" ")[0]


def nested_equations(jaxpr):
    """Every equation of a jaxpr with those of the jaxprs nested in it (jit, cond, while, remat, custom_vjp, ...),
    as (equation, the jaxpr holding it); a pallas_call's kernel body is not entered."""
    for eqn in jaxpr.eqns:
        yield eqn, jaxpr
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for inner in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from nested_equations(inner)


def live_kernel_calls(jaxpr, name):
    """How many pallas_calls called `name` in a jaxpr (nested ones included) have an output that is used.

    Pallas calls are never removed by JAX's dead-code pass (XLA removes them at compile time), so a call whose
    outputs nothing reads is not counted: it does not run.
    """
    return live_equations(jaxpr, lambda eqn: eqn.primitive.name == "pallas_call" and kernel_name(eqn) == name)


def live_equations(jaxpr, matches):
    """How many equations for which matches(equation) is true, in a jaxpr and those nested in it, have an output
    that is used."""
    used = {}  # per holding jaxpr: the ids of the variables its equations read or it returns

    def is_used(var, holder):
        if id(holder) not in used:
            used[id(holder)] = ({id(v) for e in holder.eqns for v in e.invars} | {id(v) for v in holder.outvars})
        return id(var) in used[id(holder)]

    return sum(1 for eqn, holder in nested_equations(jaxpr)
               if matches(eqn) and any(is_used(v, holder) for v in eqn.outvars))
