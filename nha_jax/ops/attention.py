"""nha_attention: the one entry point to Native Hybrid Attention, whatever implementation runs it."""
import numbers

import jax
import jax.numpy as jnp

import pallas_kernels
from nha_jax.ops.chunked import nha_chunked
from nha_jax.ops.decode import NHAState, init_state
from nha_jax.ops.reference import nha_naive, nha_recurrent
from nha_jax.ops.rope import apply_rope
from nha_jax.ops.segments import runs_and_positions

IMPLS = ("recurrent", "naive", "chunked", "pallas_triton", "pallas_mosaic_gpu", "pallas_tpu", "auto")


def nha_attention(q, k, v, log_alpha, *, window, scale=None, rope_theta=10000.0, segment_ids=None,
                  initial_state=None, return_state=False, impl="auto", chunk_size=64):
    """Native Hybrid Attention (NHA_SPEC section 1): m gated slots for the long past, a sliding window of the last
    `window` tokens for the near past, one softmax over both.

    Args:
      q: [B, T, H, dk] queries. k: [B, T, Hkv, dk] keys. v: [B, T, Hkv, dv] values. H % Hkv == 0 (GQA: query head
        h reads kv head h // (H // Hkv)).
      log_alpha: [B, T, Hkv, m] log forget gates (<= 0); write strength 1 - exp(log_alpha). m = 0 means no slots.
      window: int >= 0, tokens in the window counting the current one. 0 = Gated Slot Attention; >= T = causal
        softmax attention plus m sink slots. window = 0 with m = 0 is an error.
      scale: logit scale for both branches, default dk ** -0.5.
      rope_theta: RoPE base for the window logits (the slot branch never rotates); or a tuple of the dk/2 inverse
        frequencies (scaled RoPE, e.g. Llama-3's); None turns RoPE off.
      segment_ids: int [B, T] or None. Packed documents: nothing crosses a change of id; slots, window and RoPE
        positions restart at each document start.
      initial_state: an NHAState (window W entries) to continue from. The first document of this call continues it
        when its segment id equals initial_state.segment (always, when segment_ids is None).
      return_state: also return the NHAState after the last token (the decode cache; its ring holds W entries).
      impl: "recurrent" | "naive" | "chunked" | "pallas_triton" | "pallas_mosaic_gpu" | "pallas_tpu" | "auto".
      chunk_size: tokens per chunk of the chunked path.
    Returns:
      out [B, T, H, dv] in q.dtype, or (out, NHAState) with return_state.
    """
    B, T, H, dk, Hkv, dv, m = _check_args(q, k, v, log_alpha, window, scale, rope_theta, segment_ids, initial_state,
                                          impl, chunk_size)
    scale = dk ** -0.5 if scale is None else float(scale)
    stateful = initial_state is not None or return_state
    if impl == "auto":
        impl = _auto_impl()
        if (impl == "pallas_triton" and (m == 0 or window >= T) and dv == dk and not stateful
                and segment_ids is None and q.dtype in (jnp.bfloat16, jnp.float16)):
            # No slots is plain causal (sliding-window) attention, and a full window leaves the slots empty: m
            # logit-0, value-0 sinks (NHA_SPEC section 1). cuDNN's flash attention runs both.
            full = window >= T
            return causal_softmax_attention(q, k, v, scale=scale, rope_theta=rope_theta, implementation="cudnn",
                                            window=None if full else window, sinks=m if full else 0)
    if impl == "naive":
        if stateful:
            raise ValueError("impl='naive' takes no initial_state/return_state; use impl='chunked' or 'recurrent'.")
        return nha_naive(q, k, v, log_alpha, window=window, scale=scale, rope_theta=rope_theta,
                         segment_ids=segment_ids)
    if impl == "recurrent":
        out, state = nha_recurrent(q, k, v, log_alpha, window=window, scale=scale, rope_theta=rope_theta,
                                   segment_ids=segment_ids, initial_state=initial_state)
        return (out, state) if return_state else out

    state = initial_state
    if state is None:
        # Without a state to hand back, a ring longer than the sequence would only hold empty entries.
        state = init_state(B, Hkv, m, dk, dv, window if stateful else min(window, T), k.dtype)
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    continues = jnp.ones((B,), bool) if segment_ids is None else seg[:, 0] == state.segment
    runs, positions = runs_and_positions(seg, continues, state.position)
    # The state's window entries belong to run 0 when the first document continues it, else to no run (-1).
    ring_runs = jnp.where((state.ring_pos >= 0) & continues[:, None], 0, -1).astype(jnp.int32)
    run_fn = _chunked_call if impl == "chunked" else _kernel_call
    out, (slot_k, slot_v, ring_k, ring_v, ring_la, ring_run, ring_pos) = run_fn(
        impl, q, k, v, log_alpha, runs, positions, state, ring_runs, continues, stateful, window=window, scale=scale,
        rope_theta=rope_theta, chunk_size=chunk_size)
    if not return_state:
        return out
    final = NHAState(slot_k=slot_k, slot_v=slot_v, ring_k=ring_k, ring_v=ring_v, ring_log_alpha=ring_la,
                     ring_pos=jnp.where(ring_run == runs[:, -1:], ring_pos, -1),
                     segment=state.segment if segment_ids is None else seg[:, -1],
                     position=positions[:, -1] + 1)
    return out, final


def _chunked_call(impl, q, k, v, log_alpha, runs, positions, state, ring_runs, continues, stateful, *, window,
                  scale, rope_theta, chunk_size):
    """The XLA path: the scan carries the state itself. Returns (out, final slots and ring with run ids)."""
    del impl, stateful
    carry = (state.slot_k, state.slot_v, state.ring_k, state.ring_v, state.ring_log_alpha, ring_runs,
             state.ring_pos, jnp.where(continues, 0, -1).astype(jnp.int32))
    out, carry = nha_chunked(q, k, v, log_alpha, runs, positions, carry, window=window, scale=scale,
                             rope_theta=rope_theta, chunk_size=chunk_size)
    return out, carry[:7]


def _kernel_call(impl, q, k, v, log_alpha, runs, positions, state, ring_runs, continues, stateful, *, window,
                 scale, rope_theta, chunk_size):
    """A Pallas kernel: the state's window entries are prepended as tokens, its slots passed as initial slots.

    Returns (out, final slots and ring with run ids), like _chunked_call. The kernels pick their own block sizes.
    """
    del chunk_size
    kernel, platform = pallas_kernels.get_kernel(impl)
    # Under a mesh the program is for the mesh's devices, which need not be the default backend's (ahead-of-time
    # compilation for a TPU topology on a CPU host: nha_jax.aot).
    mesh_device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    backend = jax.default_backend() if mesh_device is None else mesh_device.platform
    if backend not in (platform, "cpu"):
        raise ValueError(f"impl={impl!r} runs on {platform} (or interpreted on cpu), not on {backend}; "
                         f"use impl='auto'.")

    def run_kernel(*args, **kwargs):
        return kernel(*args, window=window, scale=scale, rope_theta=rope_theta, interpret=backend == "cpu", **kwargs)

    if not stateful:
        out = _on_context_mesh(run_kernel, (q, k, v, log_alpha, runs, positions),
                               ("tokens",) * 4 + ("rows",) * 2, "tokens")
        return out, (None,) * 7
    W = window
    with_ring = lambda ring, x: jnp.concatenate([ring.astype(x.dtype), x], axis=1)
    q_ext = with_ring(jnp.zeros((q.shape[0], W) + q.shape[2:], q.dtype), q)
    k_ext, v_ext = with_ring(state.ring_k, k), with_ring(state.ring_v, v)
    la_ext = with_ring(state.ring_log_alpha, log_alpha.astype(jnp.float32))
    runs_ext, pos_ext = with_ring(ring_runs, runs), with_ring(jnp.maximum(state.ring_pos, 0), positions)
    slot_k0 = jnp.where(continues[:, None, None, None], state.slot_k, 0.0)
    slot_v0 = jnp.where(continues[:, None, None, None], state.slot_v, 0.0)
    out, slot_k, slot_v = _on_context_mesh(
        lambda *args: run_kernel(*args, return_slots=True),
        (q_ext, k_ext, v_ext, la_ext, runs_ext, pos_ext, slot_k0, slot_v0),
        ("tokens",) * 4 + ("rows",) * 2 + ("slots",) * 2, ("tokens", "slots", "slots"))
    last = lambda x: x[:, x.shape[1] - W:]
    ring_pos = jnp.where(last(runs_ext) >= 0, last(pos_ext), -1)
    ring = (last(k_ext).astype(state.ring_k.dtype), last(v_ext).astype(state.ring_v.dtype), last(la_ext),
            last(runs_ext), ring_pos)
    return out[:, W:], (slot_k, slot_v) + ring


def _on_context_mesh(call, args, in_layouts, out_layouts):
    """call(*args), inside jax.shard_map when a mesh is in context (jax.set_mesh / jax.sharding.use_mesh).

    Pallas kernels are custom calls that XLA's partitioner cannot split (Mosaic refuses to be partitioned), so
    under a mesh every device runs the kernel on its own rows and heads: batch over the mesh's "data" and "fsdp"
    axes, heads over "tensor". Axes the mesh lacks, or that are already manual (inside a shard_map), are left out;
    any other axis replicates. Layouts name each array's shape: "tokens" [B, T, heads, d], "rows" [B, T],
    "slots" [B, Hkv, m, d]; out_layouts is one layout or a tuple matching call's outputs.
    """
    mesh = jax.sharding.get_abstract_mesh()
    free = [] if mesh.empty else [name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                                  if kind != jax.sharding.AxisType.Manual]
    batch_axes = tuple(name for name in ("data", "fsdp") if name in free)
    head_axis = "tensor" if "tensor" in free else None
    if not batch_axes and head_axis is None:
        return call(*args)
    batch_shards = 1
    for name in batch_axes:
        batch_shards *= mesh.shape[name]
    tensor = mesh.shape[head_axis] if head_axis else 1
    head_dim_of = {"tokens": 2, "rows": None, "slots": 1}
    for x, layout in zip(args, in_layouts):
        if x.shape[0] % batch_shards:
            raise ValueError(f"batch B={x.shape[0]} must divide over the mesh's {'*'.join(batch_axes)} = "
                             f"{batch_shards} devices for the Pallas kernels; change the batch or the mesh.")
        heads = None if head_dim_of[layout] is None else x.shape[head_dim_of[layout]]
        if heads is not None and heads % tensor:
            raise ValueError(f"the Pallas kernels split heads over the mesh's 'tensor' axis ({tensor} devices), but "
                             f"an input has {heads} heads (q and kv heads must both divide); set mesh.tensor to a "
                             f"divisor of num_kv_heads.")
    spec = {"tokens": jax.sharding.PartitionSpec(batch_axes, None, head_axis, None),
            "rows": jax.sharding.PartitionSpec(batch_axes, None),
            "slots": jax.sharding.PartitionSpec(batch_axes, head_axis, None, None)}
    out_specs = spec[out_layouts] if isinstance(out_layouts, str) else tuple(spec[name] for name in out_layouts)
    # check_vma=False: pallas_call carries no varying-manual-axes rule for its outputs.
    return jax.shard_map(call, mesh=mesh, in_specs=tuple(spec[name] for name in in_layouts), out_specs=out_specs,
                         check_vma=False)(*args)


def _check_args(q, k, v, log_alpha, window, scale, rope_theta, segment_ids, initial_state, impl, chunk_size):
    """Validates nha_attention's arguments; returns (B, T, H, dk, Hkv, dv, m)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("log_alpha", log_alpha)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name} must be 4-D [B, T, heads, dim]; got shape {jnp.shape(x)}.")
    B, T, H, dk = q.shape
    Hkv, dv, m = k.shape[2], v.shape[3], log_alpha.shape[3]
    if k.shape != (B, T, Hkv, dk):
        raise ValueError(f"k must be [B, T, Hkv, dk] = [{B}, {T}, Hkv, {dk}] to match q {q.shape}; got {k.shape}.")
    if v.shape[:3] != (B, T, Hkv):
        raise ValueError(f"v must be [B, T, Hkv, dv] with B, T, Hkv = {B}, {T}, {Hkv} as in k; got {v.shape}.")
    if log_alpha.shape[:3] != (B, T, Hkv):
        raise ValueError(f"log_alpha must be [B, T, Hkv, m] with B, T, Hkv = {B}, {T}, {Hkv}; got {log_alpha.shape}.")
    if H % Hkv:
        raise ValueError(f"q heads H={H} must be a multiple of the kv heads Hkv={Hkv} (GQA).")
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 = pure slots, >= T = full attention); got {window!r}.")
    if window == 0 and m == 0:
        raise ValueError("window = 0 with m = 0 slots attends to nothing; give log_alpha m > 0 slots or a window > 0.")
    if scale is not None and not float(scale) > 0:
        raise ValueError(f"scale must be > 0 (or None for dk ** -0.5); got {scale!r}.")
    if rope_theta is not None:
        if isinstance(rope_theta, tuple):
            if len(rope_theta) != dk // 2 or not all(float(f) > 0 for f in rope_theta):
                raise ValueError(f"rope_theta as a tuple must hold dk/2 = {dk // 2} positive inverse frequencies; "
                                 f"got {len(rope_theta)} values.")
        elif not float(rope_theta) > 0:
            raise ValueError(f"rope_theta must be > 0, a tuple of dk/2 inverse frequencies, or None to turn RoPE "
                             f"off; got {rope_theta!r}.")
        if dk % 2:
            raise ValueError(f"RoPE needs an even head dim; got dk={dk}. Pass rope_theta=None or use an even dk.")
    if segment_ids is not None:
        if jnp.shape(segment_ids) != (B, T) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be an integer array of shape [B, T] = [{B}, {T}]; got "
                             f"{jnp.shape(segment_ids)} {getattr(segment_ids, 'dtype', type(segment_ids))}.")
    if initial_state is not None:
        if not isinstance(initial_state, NHAState):
            raise ValueError(f"initial_state must be an NHAState; got {type(initial_state).__name__}.")
        want = {"slot_k": (B, Hkv, m, dk), "slot_v": (B, Hkv, m, dv), "ring_k": (B, window, Hkv, dk),
                "ring_v": (B, window, Hkv, dv), "ring_log_alpha": (B, window, Hkv, m), "ring_pos": (B, window),
                "segment": (B,), "position": (B,)}
        for field, shape in want.items():
            got = getattr(initial_state, field).shape
            if got != shape:
                raise ValueError(f"initial_state.{field} has shape {got}; expected {shape} for these inputs and "
                                 f"window={window}. Build it with init_state(...) or a return_state of the same layer.")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
    return B, T, H, dk, Hkv, dv, m


def prefill(q, k, v, log_alpha, *, window, scale=None, rope_theta=10000.0, segment_ids=None, initial_state=None,
            impl="auto", chunk_size=64):
    """Runs a prompt through NHA and returns (out [B, T, H, dv], NHAState) ready for decode_step.

    The same as nha_attention(..., return_state=True); the state's ring holds `window` entries, so for a
    full-attention layer pass window = the longest context to be decoded.
    """
    return nha_attention(q, k, v, log_alpha, window=window, scale=scale, rope_theta=rope_theta,
                         segment_ids=segment_ids, initial_state=initial_state, return_state=True, impl=impl,
                         chunk_size=chunk_size)


def causal_softmax_attention(q, k, v, *, scale, rope_theta, implementation, window=None, sinks=0):
    """Causal softmax attention with RoPE, via jax.nn.dot_product_attention: what NHA is with m = 0 (window None:
    every earlier token; else the last `window` tokens, the current one included), or, with `sinks` = m and
    window None, what NHA is with a full window: the m slots never get a token, so each is a logit-0, value-0 entry.
    q [B,T,H,dk], k [B,T,Hkv,dk], v [B,T,Hkv,dv] -> [B,T,H,dv] in q.dtype."""
    if sinks and window is not None:
        raise ValueError("sinks stand for never-written slots, which only a full window (window=None) leaves empty")
    if rope_theta is not None:
        positions = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
        q = apply_rope(q, positions, rope_theta).astype(q.dtype)
        k = apply_rope(k, positions, rope_theta).astype(k.dtype)
    if sinks:
        # Zero keys give logit 0 and zero values add nothing: m zero tokens in front are the sinks. Zero queries
        # in front keep the causal mask aligned (query s + t sees the sinks and tokens <= t); their rows are dropped.
        zeros_in_front = lambda x: jnp.pad(x, [(0, 0), (sinks, 0), (0, 0), (0, 0)])
        q, k, v = zeros_in_front(q), zeros_in_front(k), zeros_in_front(v)
    local_window = None if window is None else (window - 1, 0)
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=local_window,
                                       implementation=implementation)
    return out[:, sinks:]


def _auto_impl():
    """The fastest correct implementation for the default backend (see docs/PERFORMANCE.md)."""
    return {"gpu": "pallas_triton", "tpu": "pallas_tpu"}.get(jax.default_backend(), "chunked")
