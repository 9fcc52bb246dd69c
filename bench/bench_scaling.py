"""Multi-GPU scaling of the sharded train step: one GPU against every one-axis mesh (data, fsdp, tensor) over all
visible GPUs, for the NHA-340M config at T = 2048 on random tokens.

    python bench/bench_scaling.py [--config nha_340m] [--rows-per-gpu 8] [--check-steps 3] [--steps 6]
                                  [--compile-threads 0] [--mesh-timeout 0] [--set key=value ...]

Work per GPU is held fixed: the N-GPU meshes train a global batch of rows_per_gpu x N rows; the one-GPU reference
trains the same global batch as N microbatches (grad_accum_steps = N: the same gradient, the memory of rows_per_gpu
rows). Every run starts from the same initial state and sees the same batches, so the first check_steps losses and
gradient norms must agree with the one-GPU run within bf16 tolerance (warm-up cut to one step, so those steps
update the parameters); then `steps` steps are timed one by one (median). Efficiency = tokens/s per GPU on the mesh
/ tokens/s of the one-GPU run. The step is built as the trainer builds it (nha_jax.training: state_layout,
jit_train_step under jax.set_mesh), so the Pallas kernels run under jax.shard_map: batch over data/fsdp, heads
over tensor. The compiles run concurrently in threads (XLA compiles on the host's cores; --compile-threads 1 for one
at a time); the timed steps run one mesh at a time. Prints a table last; exit 1 if a check fails.
"""
import argparse
import concurrent.futures
import faulthandler
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nha_jax.model import layer_windows  # noqa: E402
from nha_jax.sharding import logical_to_mesh_spec, make_mesh  # noqa: E402
from nha_jax.training.config import apply_overrides, load_config_file, validate, validate_for_devices  # noqa: E402
from nha_jax.training.metrics import peak_flops_per_device, train_flops_per_token  # noqa: E402
from nha_jax.training.optimizer import build_optimizer, learning_rate_schedule  # noqa: E402
from nha_jax.training.state import state_layout  # noqa: E402
from nha_jax.training.step import jit_train_step  # noqa: E402

LOSS_RTOL = 1e-2  # bf16 activations and matmul inputs: different partial-sum orders move the loss by ~1e-3
GRAD_NORM_RTOL = 5e-2
GIB = 2 ** 30


def mesh_variants(gpus: int, kv_heads: int) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, (data, fsdp, tensor)) for one GPU and for each axis alone over all `gpus` (tensor if heads divide)."""
    variants = [("1 GPU", (1, 1, 1))]
    if gpus > 1:
        variants += [(f"data={gpus}", (gpus, 1, 1)), (f"fsdp={gpus}", (1, gpus, 1))]
        if kv_heads % gpus == 0:
            variants.append((f"tensor={gpus}", (1, 1, gpus)))
    return variants


def random_batches(rows: int, seq_len: int, vocab: int, count: int = 2) -> list[dict]:
    """`count` batches of random tokens (int32 [rows, seq_len]; loss_mask float32), one document per row, so the
    full-window layers attend over all of T."""
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(count):
        tokens = rng.integers(0, vocab, size=(rows, seq_len + 1)).astype(np.int32)
        batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                        "segment_ids": np.ones((rows, seq_len), np.int32),
                        "loss_mask": np.ones((rows, seq_len), np.float32)})
    return batches


class Run:
    """One mesh: its config, the trainer's jitted step lowered for abstract inputs, then compiled and timed."""

    def __init__(self, name, base_config, mesh_shape, gpus, global_rows):
        self.name, self.mesh_shape = name, mesh_shape
        self.devices = jax.devices()[:int(np.prod(mesh_shape))]
        config = apply_overrides(base_config.copy_and_resolve_references(), [
            f"global_batch_size={global_rows}", f"grad_accum_steps={gpus // len(self.devices)}",
            f"mesh.data={mesh_shape[0]}", f"mesh.fsdp={mesh_shape[1]}", f"mesh.tensor={mesh_shape[2]}"])
        validate(config)
        validate_for_devices(config, len(self.devices), 1)
        self.config = config
        self.mesh = make_mesh(*mesh_shape, devices=self.devices)
        self.optimizer = build_optimizer(config.optimizer, config.total_steps)
        self.layout = state_layout(config, self.optimizer, self.mesh)
        self.batch_sharding = NamedSharding(self.mesh, logical_to_mesh_spec(("batch", "seq")))
        rows = (global_rows, config.seq_len)
        abstract_batch = {name: jax.ShapeDtypeStruct(rows, np.int32, sharding=self.batch_sharding)
                          for name in ("inputs", "targets", "segment_ids")}
        abstract_batch["loss_mask"] = jax.ShapeDtypeStruct(rows, np.float32, sharding=self.batch_sharding)
        schedule = learning_rate_schedule(config.optimizer, config.total_steps)
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):
            step = jit_train_step(self.layout, self.optimizer, schedule, config.grad_accum_steps, self.batch_sharding)
            self.lowered = step.lower(self.layout.abstract_with_shardings(), abstract_batch)
            # The initial state's program too: compiling it takes XLA:GPU about a minute at 340M, so it joins the
            # concurrent compiles rather than running mesh by mesh.
            seed = jax.random.PRNGKey(config.seed)
            self.init_lowered = jax.jit(self.layout.init_fn, out_shardings=self.layout.shardings).lower(seed)
        self.row = {"mesh": name, "gpus": len(self.devices), "global_rows": global_rows,
                    "grad_accum_steps": config.grad_accum_steps, "lower_s": time.perf_counter() - start}

    def compile(self):
        """Compiles the lowered step and initialiser (thread-safe: XLA compiles on the host); records the time and
        the step's per-GPU memory."""
        start = time.perf_counter()
        self.compiled = self.lowered.compile()
        self.init_compiled = self.init_lowered.compile()
        memory = self.compiled.memory_analysis()
        self.row["compile_s"] = time.perf_counter() - start
        self.row["xla_gib_per_gpu"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                       - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / GIB

    def measure(self, batches: list[dict], check_steps: int, steps: int) -> None:
        """Runs check_steps + steps steps from the seeded initial state; records losses, grad norms, step times."""
        state = self.init_compiled(jax.random.PRNGKey(self.config.seed))
        on_device = [jax.device_put(batch, self.batch_sharding) for batch in batches]
        losses, grad_norms, times = [], [], []
        for index in range(check_steps + steps):
            start = time.perf_counter()
            state, metrics = self.compiled(state, on_device[index % len(on_device)])
            metrics = jax.device_get(metrics)  # waits for the step
            times.append(time.perf_counter() - start)
            losses.append(float(metrics["loss"]))
            grad_norms.append(float(metrics["grad_norm"]))
        del state
        seq_len = self.config.seq_len
        step_s = float(np.median(times[check_steps:]))
        tokens_per_sec = self.row["global_rows"] * seq_len / step_s
        windows = layer_windows(self.config.model, seq_len)
        flops_per_token = train_flops_per_token(self.layout.abstract_state["params"], self.config.model, windows,
                                                seq_len)
        peak = peak_flops_per_device(self.devices[0])
        self.row.update(losses=losses[:check_steps], grad_norms=grad_norms[:check_steps], step_ms=1e3 * step_s,
                        step_ms_min=1e3 * min(times[check_steps:]), step_ms_max=1e3 * max(times[check_steps:]),
                        tokens_per_sec=tokens_per_sec, tokens_per_sec_per_gpu=tokens_per_sec / len(self.devices),
                        mfu=tokens_per_sec * flops_per_token / (peak * len(self.devices)) if peak else 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="nha_340m", help="a configs/<name>.py")
    parser.add_argument("--rows-per-gpu", type=int, default=8, help="rows of seq_len tokens per GPU per microbatch")
    parser.add_argument("--check-steps", type=int, default=3, help="first steps whose losses are compared")
    parser.add_argument("--steps", type=int, default=6, help="timed steps after the checked ones")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--compile-threads", type=int, default=0, help="concurrent compiles (0 = one per mesh)")
    parser.add_argument("--out", default="", help="also write the rows as JSON lines here")
    parser.add_argument("--mesh-timeout", type=float, default=0, help="seconds one mesh may take to run its steps "
                        "before the stacks are printed and the run ends (0 = no limit)")
    args = parser.parse_args()

    gpus = jax.device_count()
    # Warm-up cut to one step: the checked steps then apply real updates (at the config's 1024-step warm-up the first
    # learning rates are ~0 and the check would see the initial parameters only).
    base = apply_overrides(load_config_file(str(REPO / "configs" / f"{args.config}.py")),
                           ["optimizer.warmup_steps=1", *args.set])
    if base.model.vocab_size == 0:
        base.model.vocab_size = 32000
    global_rows = args.rows_per_gpu * gpus
    runs = [Run(name, base, shape, gpus, global_rows) for name, shape in mesh_variants(gpus, base.model.num_kv_heads)]
    with concurrent.futures.ThreadPoolExecutor(args.compile_threads or len(runs)) as pool:
        list(pool.map(Run.compile, runs))
    batches = random_batches(global_rows, base.seq_len, base.model.vocab_size)
    for run in runs:
        if args.mesh_timeout:  # a mesh that hangs (a stuck collective) prints every thread's stack and ends the run
            faulthandler.dump_traceback_later(args.mesh_timeout, exit=True)
        run.measure(batches, args.check_steps, args.steps)
        faulthandler.cancel_dump_traceback_later()
        print(json.dumps(run.row), flush=True)

    reference = runs[0].row
    failed = False
    for run in runs:
        row = run.row
        row["efficiency"] = row["tokens_per_sec_per_gpu"] / reference["tokens_per_sec_per_gpu"]
        row["loss_rel_diff"] = max(abs(a / b - 1) for a, b in zip(row["losses"], reference["losses"]))
        row["grad_norm_rel_diff"] = max(abs(a / b - 1) for a, b in zip(row["grad_norms"], reference["grad_norms"]))
        row["matches"] = row["loss_rel_diff"] <= LOSS_RTOL and row["grad_norm_rel_diff"] <= GRAD_NORM_RTOL
        failed |= not row["matches"]
    if args.out:
        Path(args.out).write_text("".join(json.dumps(run.row) + "\n" for run in runs))

    print(f"\n{args.config}, T={base.seq_len}, {args.rows_per_gpu} rows/GPU/microbatch, global batch {global_rows} "
          f"rows, device: {jax.devices()[0].device_kind} x{gpus}, jax {jax.__version__}")
    print(f"{'mesh':<11}{'accum':>6}{'step ms':>9}{'tok/s':>9}{'tok/s/GPU':>10}{'eff.':>7}{'MFU':>7}{'GiB/GPU':>8}"
          f"{'compile s':>10}  first losses (max rel diff, grad-norm rel diff)")
    for run in runs:
        r = run.row
        losses = ", ".join(f"{x:.4f}" for x in r["losses"])
        print(f"{r['mesh']:<11}{r['grad_accum_steps']:>6}{r['step_ms']:>9.1f}{r['tokens_per_sec']:>9.0f}"
              f"{r['tokens_per_sec_per_gpu']:>10.0f}{100 * r['efficiency']:>6.1f}%{100 * r['mfu']:>6.1f}%"
              f"{r['xla_gib_per_gpu']:>8.1f}{r['compile_s']:>10.1f}  {losses} ({r['loss_rel_diff']:.1e}, "
              f"{r['grad_norm_rel_diff']:.1e}){'' if r['matches'] else '  MISMATCH'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
