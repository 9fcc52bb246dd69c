"""Issue 3 benchmark on one GPU: NHA Pallas (Triton) kernels against our chunked XLA path and cuDNN attention.

Runs a correctness check against the chunked path first, then times forward and forward+backward (bf16) at
S1 = (B=8, T=2048), S2 = (B=2, T=8192), S3 = (B=1, T=32768), all with H=16, dk=dv=128, m=64, W=64.
Prints one table (median ms; the NHA kernels' achieved TFLOP/s and TB/s, forward and forward+backward, by the counts
of `nha_counts`, and their share of the issue's ceilings, PEAK_TFLOPS and PEAK_TBPS).
First it splits forward and backward into XLA preparation and each kernel, for each --sweep variant.
Usage: python bench/bench_kernels.py [--shapes S1,S2,S3] [--reps 30] [--skip-check] [--sweep table,chunk64,...|none]
       [--timings no] [--impls pallas_triton,chunked_xla,cudnn_causal,cudnn_swa] [--profile [--top 15]]
flash_triton / flash_mosaic_gpu (--impls) time JAX's bundled Pallas flash attention (causal) as lowering references.
pallas_scan / pallas_sequential force the slot states' XLA scan or sequential kernels (TritonConfig.scan_states);
pallas:<variant> times the whole op with a --sweep variant's changes (e.g. pallas:chunk32_sub32_stack2), which is how
variants of the XLA-scan path are compared (the breakdown times the sequential kernels only).
--profile also prints each impl's forward+backward device time per kernel (XLA fusions included) per shape.
--once runs one Pallas forward+backward at the first shape and exits: a target for Nsight Compute, e.g.
  ncu --clock-control none --kernel-name regex:nha --section Occupancy python3 -m bench.bench_kernels --once
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from bench.common import kernel_table, make_inputs, print_kernel_table
from nha_jax.ops import nha_attention
from nha_jax.ops.segments import runs_and_positions
from pallas_kernels.triton import (_heads_per_state_program, _output_backward, _outputs, _prepare, _slot_states,
                                   _state_backward, _state_splits, _window_backward, _window_dq,
                                   nha_attention_triton, table_config)
from pallas_kernels.tuning import triton_config

SHAPES = {"S1": (8, 2048), "S2": (2, 8192), "S3": (1, 32768)}
HEADS, KV_HEADS, HEAD_DIM, SLOTS, WINDOW = 16, 16, 128, 64, 64  # --dims replaces them


def pallas_fn(window, **config_changes):
    """The Pallas path with the tuning table's row, changed by config_changes (TritonConfig fields)."""
    def run(q, k, v, log_alpha):
        batch, seq = q.shape[:2]
        seg = jnp.zeros((batch, seq), jnp.int32)
        runs, pos = runs_and_positions(seg, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
        config = dataclasses.replace(table_config(batch, k.shape[2], q.shape[3], v.shape[3], log_alpha.shape[3]),
                                     **config_changes)
        return nha_attention_triton(q, k, v, log_alpha, runs, pos, window=window, scale=q.shape[-1] ** -0.5,
                                    rope_theta=10000.0, config=config)
    return run


def chunked_fn(window):
    return lambda q, k, v, log_alpha: nha_attention(q, k, v, log_alpha, window=window, impl="chunked")


def cudnn_fn(local_window):
    def run(q, k, v, log_alpha):
        del log_alpha
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                            local_window_size=local_window)
    return run


def bundled_flash_fn(lowering):
    """Causal flash attention from JAX's own Pallas ops: "triton" (fwd+bwd) or "mosaic_gpu" (its backward has no
    causal mask in jax 0.11, so only the forward is timed): where each Pallas GPU lowering stands against cuDNN.
    The Mosaic GPU kernel takes float16 q, k, v (bf16 fails to lower) and no softmax scale; its `prepare` casts and
    scales the inputs once, outside the timed calls. Imported when traced: only a run that asks for them needs them."""
    def run(q, k, v, log_alpha):
        del log_alpha
        if lowering == "triton":
            from jax.experimental.pallas.ops.gpu import attention
            return attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True)
        from jax.experimental.pallas.ops.gpu import attention_mgpu
        config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
        return attention_mgpu.attention(q, k, v, config)

    if lowering == "mosaic_gpu":
        run.prepare = lambda q, k, v, log_alpha: (
            (q * q.shape[-1] ** -0.5).astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), log_alpha)
    return run


def median_ms(fn, args, reps):
    """Median wall time of fn(*args) in ms after two warm-up calls (each call synchronised)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# The measured ceilings of one H100 the issue gives for the roofline: bf16 matmul and HBM bandwidth.
PEAK_TFLOPS, PEAK_TBPS = 660.0, 3.0


def nha_counts(batch, seq, window):
    """(useful FLOPs, minimum HBM bytes) of the NHA forward at the --dims sizes (NOTES_kernels.md, "The two
    numbers"). FLOPs per token: per query head slot logits 2 dk m, slot read 2 m dv, window logits and read
    2 W (dk + dv); per kv head the slot writes 2 m (dk + dv). Bytes: q, k, v and out once in bf16, log_alpha in
    float32. Forward+backward counts 3x both (the two gradient products of every forward product, as in 6N =
    3 x 2N; the inputs, output and output gradient read and the four input gradients written once)."""
    dk = dv = HEAD_DIM
    per_token = (HEADS * 2 * (dk * SLOTS + SLOTS * dv + window * (dk + dv))
                 + KV_HEADS * 2 * SLOTS * (dk + dv))
    bytes_per_token = 2 * (HEADS * (dk + dv) + KV_HEADS * (dk + dv)) + 4 * KV_HEADS * SLOTS
    return batch * seq * per_token, batch * seq * bytes_per_token


# The check's cases: (dtype, T, W, gate scale). The last: strong decay (log alpha down to about -10) must not
# overflow the gate exponents.
CHECK_ROWS = ((jnp.float32, 300, 64, 1), (jnp.float32, 257, 200, 1), (jnp.bfloat16, 1024, 64, 1),
              (jnp.float32, 300, 16, 80))


def check(key, state_paths=("sequential", "scan"), row_indices=range(len(CHECK_ROWS)), variant=None):
    """Pallas vs chunked on the GPU: float32 and bf16, forward and gradients, with segments and GQA (groups of 4:
    the output kernels stack a group's rows), at the --dims head sizes with the tuning table's row, the slot states
    by the sequential kernels and by the XLA scan (with one sub-block per chunk, which the scan needs)."""
    rows = []
    jax.config.update("jax_default_matmul_precision", "highest")  # the XLA reference in true float32
    for dtype, seq, window, gate_scale in (CHECK_ROWS[i] for i in row_indices):
        q, k, v, la, ct = make_inputs(key, 2, seq, 16, 4, HEAD_DIM, HEAD_DIM, SLOTS, dtype=dtype)
        la = la * gate_scale
        seg = jnp.concatenate([jnp.zeros((2, seq // 3), jnp.int32), jnp.ones((2, seq - seq // 3), jnp.int32)], 1)
        runs, pos = runs_and_positions(seg, jnp.zeros((2,), bool), jnp.zeros((2,), jnp.int32))

        def loss_chunked(q, k, v, la):
            out = nha_attention(q, k, v, la, window=window, segment_ids=seg, impl="chunked")
            return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32)), out

        grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True))
        gc, oc = grad(loss_chunked)(q, k, v, la)
        def rel(a, b):  # 0 when both are exactly zero (d log_alpha when W covers every document)
            error, size = (float(jnp.linalg.norm(x.astype(jnp.float32))) for x in (a - b, b))
            return error / size if size else error
        for states in state_paths:  # the ways to the slot states (TritonConfig.scan_states)
            config = dataclasses.replace(table_config(k.shape[0], k.shape[2], k.shape[3], v.shape[3], la.shape[3]),
                                         scan_states=states == "scan", **SWEEP.get(variant, {}))
            if states == "scan":
                config = dataclasses.replace(config, sub_block=config.chunk)

            def loss_pallas(q, k, v, la, config=config):
                out = nha_attention_triton(q, k, v, la, runs, pos, window=window, scale=q.shape[-1] ** -0.5,
                                           rope_theta=10000.0, config=config)
                return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32)), out

            gp, op = grad(loss_pallas)(q, k, v, la)
            errs = [rel(op, oc)] + [rel(a, b) for a, b in zip(gp, gc)]
            nans = [bool(jnp.isnan(x).any()) for x in (op, *gp)], [bool(jnp.isnan(x).any()) for x in (oc, *gc)]
            if any(nans[0]) or any(nans[1]):
                print(f"  NaN in (out, dq, dk, dv, dlog_alpha): pallas {nans[0]}, chunked {nans[1]}")
            if not rows:
                print("correctness vs chunked (rel L2): dtype T W gate-scale states | out dq dk dv dlog_alpha")
            rows.append(errs)
            print(f"  {jnp.dtype(dtype).name:8s} {seq:5d} {window:3d} {gate_scale:3d} {states:10s} | " +
                  " ".join(f"{e:.2e}" for e in errs), flush=True)
    jax.config.update("jax_default_matmul_precision", None)


SWEEP = {  # tuning-table candidates, applied to every kernel that uses the field
    "table": {},
    "out_warps4": dict(output_warps=4),
    "bwd_warps4": dict(backward_warps=4),
    "out_warps8": dict(output_warps=8),
    "window_warps4": dict(window_warps=4),
    "window_warps8": dict(window_warps=8),
    "bwd_stages1": dict(backward_stages=1),
    "bwd_stages3": dict(backward_stages=3),
    "key_block64": dict(key_block=64),
    "sub_block32": dict(sub_block=32),
    "stages1": dict(output_stages=1, state_stages=1),
    "stages3": dict(output_stages=3, state_stages=3),
    "state_warps4": dict(state_warps=4),
    "state_stages1": dict(state_stages=1),
    "state_stages2": dict(state_stages=2),
    "state_stages3": dict(state_stages=3),
    "state_split1": dict(state_splits=1),
    "state_split2": dict(state_splits=2),
    "state_split4": dict(state_splits=4),
    "state_split8": dict(state_splits=8),
    "chunk64": dict(chunk=64),
    "chunk16": dict(chunk=16),
    "chunk32_sub16": dict(chunk=32, sub_block=16),
    "chunk32_sub32": dict(chunk=32, sub_block=32),
    "chunk64_sub32": dict(chunk=64, sub_block=32),
    "chunk64_sub64": dict(chunk=64, sub_block=64),
    "chunk64_sub32_stages1": dict(chunk=64, sub_block=32, output_stages=1, state_stages=1, backward_stages=1),
    "chunk64_sub64_warps4": dict(chunk=64, sub_block=64, output_warps=4, backward_warps=4, state_warps=4),
    "warps4": dict(output_warps=4, backward_warps=4, state_warps=4),
    "warps8": dict(output_warps=8, backward_warps=8, state_warps=8),
    "warps16": dict(output_warps=16, backward_warps=16),
    "elementwise": dict(factored_pairs=False),
    "f32_states": dict(input_dtype_states=False),
    "grouped_always": dict(grouped_state_backward_programs=0),
    "grouped_never": dict(grouped_state_backward_programs=1 << 30),
    "stack1": dict(stacked_rows=1),
    "stack2": dict(stacked_rows=32),
    "stack4": dict(stacked_rows=64),
    "stack8": dict(stacked_rows=128),
    "stack4_warps8": dict(stacked_rows=64, output_warps=8, backward_warps=8),
    "chunk32_sub32_stack2": dict(chunk=32, sub_block=32, stacked_rows=64),
    "chunk32_sub32_stack4": dict(chunk=32, sub_block=32, stacked_rows=128, output_warps=8, backward_warps=8),
    "chunk32_sub32_stack4_warps4": dict(chunk=32, sub_block=32, stacked_rows=128),
    "chunk32_sub16_stack4": dict(chunk=32, sub_block=16, stacked_rows=64),
    "key_block16": dict(key_block=16),
    "bwd_warps8": dict(backward_warps=8),
    "xla_contributions": dict(scan_contribution_kernel=False),
    "bwd_passes1": dict(backward_head_passes=1),
    "bwd_passes2": dict(backward_head_passes=2),
    "bwd_passes4": dict(backward_head_passes=4),
    "window_stages1": dict(window_stages=1),
    "window_stages3": dict(window_stages=3),
    "window_dq_stages1": dict(separate_window_dq=True, window_stages=1),
    "scan": dict(scan_states=True),
    "window_dq": dict(separate_window_dq=True),
    "window_dq_inside": dict(separate_window_dq=False),
    "scan_t16x64_u8": dict(scan_states=True, scan_tile=(16, 64), scan_unroll=8),
    "scan_t16x16_u16": dict(scan_states=True, scan_tile=(16, 16), scan_unroll=16),
    "scan_t16x32_u8": dict(scan_states=True, scan_tile=(16, 32), scan_unroll=8),
    "scan_w2": dict(scan_states=True, scan_warps=2),
    "chunk32_sub32_stack2_scan": dict(chunk=32, sub_block=32, stacked_rows=64, scan_states=True),
}


def breakdown(key, shape, reps, sweep):
    """Forward and backward split into XLA preparation and each kernel (ms), per tuning variant."""
    batch, seq = SHAPES[shape]
    q, k, v, la, ct = make_inputs(key, batch, seq, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, SLOTS)
    seg = jnp.zeros((batch, seq), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    scale = HEAD_DIM ** -0.5
    for name in sweep:
        config = dataclasses.replace(triton_config(HEAD_DIM, state_programs=batch * KV_HEADS), **SWEEP[name])
        chunk = config.chunk
        prep = jax.jit(lambda q, k, v, la, chunk=chunk: _prepare(
            q, k, v, la, seg, pos, None, None, window=WINDOW, rope_theta=10000.0, block_size=chunk)[0])
        q_p, qr, kr, v_p, ks, vs, log_gates, hk0, hv0, seg_p, run = prep(q, k, v, la)
        if name == sweep[0]:
            whole = jax.jit(pallas_fn(WINDOW))
            print(f"{shape} prepare {median_ms(prep, (q, k, v, la), reps):.3f} ms, whole forward "
                  f"{median_ms(whole, (q, k, v, la), reps):.3f} ms (tuning table)", flush=True)
        kernels = dict(
            state=jax.jit(lambda *a, config=config: _slot_states(*a, chunk=chunk, config=config, interpret=False)),
            output=jax.jit(lambda *a, config=config: _outputs(
                *a, window=WINDOW, num_slots=SLOTS, scale=scale, chunk=chunk, config=config, interpret=False)),
            output_bwd=jax.jit(lambda *a, config=config: _output_backward(
                *a, window=WINDOW, num_slots=SLOTS, scale=scale, chunk=chunk, config=config, interpret=False)),
            state_bwd=jax.jit(lambda *a, config=config: _state_backward(
                *a, chunk=chunk, config=config, interpret=False)),
            window_bwd=jax.jit(lambda *a, config=config: _window_backward(
                *a, window=WINDOW, scale=scale, chunk=chunk, config=config, interpret=False)),
            window_dq=jax.jit(lambda *a, config=config: _window_dq(
                *a, window=WINDOW, scale=scale, chunk=chunk, config=config, interpret=False)))
        times = {}

        def timed(kernel, args):  # printed at once: a kernel whose compile hangs is the one after the last line
            times[kernel] = median_ms(kernels[kernel], args, reps)
            print(f"{shape} {name} {kernel} {times[kernel]:.3f} ms", flush=True)

        try:
            args = (ks, vs, log_gates, hk0, hv0, run)
            hk, hv, hk_last, hv_last = kernels["state"](*args)
            timed("state", args)
            args = (q_p, qr, kr, v_p, ks, vs, log_gates, hk, hv, seg_p, run)
            out, lse = kernels["output"](*args)
            timed("output", args)
            d_out = jnp.pad(ct, [(0, 0), (0, out.shape[1] - seq), (0, 0), (0, 0)])
            delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
            args = (q_p, qr, kr, v_p, ks, vs, log_gates, hk, hv, seg_p, run, d_out, lse, delta)
            _, _, _, _, a, p, _ = kernels["output_bwd"](*args)
            timed("output_bwd", args)
            if config.separate_window_dq:
                timed("window_dq", (qr, kr, v_p, d_out, lse, delta, seg_p))
            splits = _state_splits(HEAD_DIM, HEAD_DIM, config)
            owners = HEADS // _heads_per_state_program(HEADS // KV_HEADS, batch * KV_HEADS * splits, config)
            dhk_last = jnp.zeros((batch, owners) + hk_last.shape[2:], jnp.float32)
            dhv_last = jnp.zeros((batch, owners) + hv_last.shape[2:], jnp.float32)
            timed("state_bwd", (q_p, d_out, a, p, ks, vs, log_gates, run, hk, hv, dhk_last, dhv_last))
            timed("window_bwd", (qr, kr, v_p, d_out, lse, delta, seg_p))
        except Exception as err:  # a variant that does not compile is reported and skipped
            print(f"{shape} {name}: {type(err).__name__}: {str(err)[:300]}")
            continue
        print(f"{shape} {name:13s} " + ", ".join(f"{k} {t:.3f}" for k, t in times.items()) + " ms", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="S1,S2,S3")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--check-states", default="sequential,scan",
                        help="slot-state paths the check runs: sequential, scan or both")
    parser.add_argument("--check-rows", default="0,1,2,3",
                        help="which cases of CHECK_ROWS the check runs (each compiles its own gradient)")
    parser.add_argument("--check-variant", default=None, choices=list(SWEEP),
                        help="check the tuning table's row with this SWEEP change instead of the row itself")
    parser.add_argument("--sweep", default="table", help=f"comma-separated from {list(SWEEP)}, or none")
    parser.add_argument("--timings", default="yes", choices=("yes", "no"), help="no: only the breakdown")
    parser.add_argument("--impls", default="pallas_triton,chunked_xla,cudnn_causal,cudnn_swa")
    parser.add_argument("--profile", action="store_true", help="per-kernel device time of each fwd+bwd")
    parser.add_argument("--top", type=int, default=15, help="kernels --profile lists per impl and shape")
    parser.add_argument("--once", action="store_true", help="one Pallas fwd+bwd at the first shape, then exit")
    parser.add_argument("--dims", default=None, help="H,Hkv,d,m,W for the breakdown and timings "
                        "(default 16,16,128,64,64; NHA-340M's layers: 16,4,64,64,32)")
    args = parser.parse_args()
    if args.dims:
        global HEADS, KV_HEADS, HEAD_DIM, SLOTS, WINDOW
        HEADS, KV_HEADS, HEAD_DIM, SLOTS, WINDOW = (int(x) for x in args.dims.split(","))
    print(f"H={HEADS} Hkv={KV_HEADS} dk=dv={HEAD_DIM} m={SLOTS} W={WINDOW}")
    print(jax.devices()[0].device_kind, "jax", jax.__version__)
    key = jax.random.PRNGKey(0)
    if args.once:
        batch, seq = SHAPES[args.shapes.split(",")[0]]
        q, k, v, la, ct = make_inputs(key, batch, seq, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, SLOTS)
        loss = lambda q, k, v, la: jnp.sum(pallas_fn(WINDOW)(q, k, v, la).astype(jnp.float32) * ct)
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, la))
        return
    if not args.skip_check:
        check(key, args.check_states.split(","), [int(i) for i in args.check_rows.split(",")], args.check_variant)
    impls = {"pallas_triton": pallas_fn(WINDOW), "pallas_scan": pallas_fn(WINDOW, scan_states=True),
             "pallas_sequential": pallas_fn(WINDOW, scan_states=False), "chunked_xla": chunked_fn(WINDOW),
             "cudnn_causal": cudnn_fn(None), "cudnn_swa": cudnn_fn((WINDOW - 1, 0)),
             "flash_triton": bundled_flash_fn("triton"), "flash_mosaic_gpu": bundled_flash_fn("mosaic_gpu")}
    for name in args.impls.split(","):
        variant = name.removeprefix("pallas:")
        if name != variant and variant in SWEEP:
            impls[name] = pallas_fn(WINDOW, **SWEEP[variant])
        elif name not in impls:
            parser.error(f"unknown --impls {name!r}: use {list(impls)} or pallas:<one of {list(SWEEP)}>")
    impls = {name: impls[name] for name in args.impls.split(",")}
    for shape in args.shapes.split(",") if args.sweep != "none" else ():
        breakdown(key, shape, args.reps, args.sweep.split(","))
    if args.timings == "no":
        return
    table = []
    for shape in args.shapes.split(","):
        batch, seq = SHAPES[shape]
        q, k, v, la, ct = make_inputs(key, batch, seq, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, SLOTS)
        flops, bytes_moved = nha_counts(batch, seq, WINDOW)
        for name, fn in impls.items():
            fwd = jax.jit(fn)
            inputs = fn.prepare(q, k, v, la) if hasattr(fn, "prepare") else (q, k, v, la)

            def loss(q, k, v, la, fn=fn):
                return jnp.sum(fn(q, k, v, la).astype(jnp.float32) * ct.astype(jnp.float32))

            fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
            cells = []
            for f in (fwd, fwd_bwd):
                try:
                    cells.append(median_ms(f, inputs, args.reps))
                except Exception as err:  # a baseline that does not run at this shape is reported, not fatal
                    print(f"{shape} {name}: {type(err).__name__}: {str(err)[:200]}")
                    cells.append(float("nan"))
            table.append((shape, name, *cells, flops, bytes_moved))
            print(f"{shape} {name}: fwd {cells[0]:.3f} ms, fwd+bwd {cells[1]:.3f} ms", flush=True)
            if args.profile:
                print_kernel_table(f"{shape} {name} fwd+bwd", kernel_table(fwd_bwd, inputs, top=args.top))
    print(f"\nNHA useful rates (nha_counts; fwd+bwd = 3x fwd) against {PEAK_TFLOPS:.0f} TFLOP/s and {PEAK_TBPS} TB/s:")
    print(f"{'shape':5s} {'impl':18s} {'fwd ms':>8s} {'f+b ms':>8s} {'us/tok f+b':>10s} {'fwd TF/s':>9s} "
          f"{'fwd TB/s':>9s} {'f+b TF/s':>9s} {'f+b TB/s':>9s} {'%FLOP':>6s} {'%HBM':>6s}")
    for shape, name, fwd_ms, fb_ms, flops, bytes_moved in table:
        batch, seq = SHAPES[shape]
        nha = name.startswith("pallas")
        rate = lambda count, ms: count / ms / 1e9 if nha else float("nan")
        fb_tflops, fb_tbps = rate(3 * flops, fb_ms), rate(3 * bytes_moved, fb_ms)
        print(f"{shape:5s} {name:18s} {fwd_ms:8.3f} {fb_ms:8.3f} {fb_ms * 1e3 / (batch * seq):10.4f} "
              f"{rate(flops, fwd_ms):9.1f} {rate(bytes_moved, fwd_ms):9.2f} {fb_tflops:9.1f} {fb_tbps:9.2f} "
              f"{100 * fb_tflops / PEAK_TFLOPS:6.1f} {100 * fb_tbps / PEAK_TBPS:6.1f}")


if __name__ == "__main__":
    main()
