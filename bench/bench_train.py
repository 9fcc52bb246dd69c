"""Training throughput: tokens/s, MFU and peak device memory of the real train step (forward, backward, AdamW),
NHA-340M against Transformer++-340M, at several sequence lengths, in one run.

    python bench/bench_train.py [--models nha_340m,transformer_340m] [--seq-lens 2048,8192]
                                [--tokens-per-step 16384] [--steps 10] [--jobs N] [--set model.remat=full ...]
                                [--profile]

--models nha_340m,nha_340m@model.remat=dots_and_attention times the same config with and without an override.

Each (model, T) runs in its own subprocess so that its peak memory is its own. Batches are random tokens, one
document per row (so full-window layers really attend over T) and no segment ids, so that the Transformer++ full
layers take cuDNN flash attention (`impl="auto"` routes there only without segments); `--packed` passes segment ids
(all ones) as the trainer does with packed data. MFU uses the FLOP count of docs/TRAINING.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wait_for_turn(turn_dir: str, run_id: str) -> None:
    """With --jobs > 1: says this run is compiled, then waits until the parent gives it the GPU to itself."""
    if not turn_dir:
        return
    Path(turn_dir, f"ready.{run_id}").touch()
    while not Path(turn_dir, f"go.{run_id}").exists():
        time.sleep(0.2)


def measure(config_name: str, seq_len: int, tokens_per_step: int, steps: int, overrides: list[str],
            packed: bool, turn_dir: str = "", run_id: str = "", profile: bool = False) -> dict:
    """Compiles and times the train step of configs/<config_name>.py at seq_len; returns one result row.
    profile: also prints the step's device time by kernel kind and its largest kernels (a profiler trace)."""
    sys.path.insert(0, str(REPO))
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from nha_jax.model import layer_windows
    from nha_jax.sharding import logical_to_mesh_spec, make_mesh
    from nha_jax.training.config import apply_overrides, load_config_file, validate
    from nha_jax.training.metrics import peak_flops_per_device, train_flops_per_token
    from nha_jax.training.optimizer import build_optimizer, learning_rate_schedule
    from nha_jax.training.state import count_params, state_layout
    from nha_jax.training.step import jit_train_step

    config = load_config_file(str(REPO / "configs" / f"{config_name}.py"))
    config.seq_len = seq_len
    config.global_batch_size = max(tokens_per_step // seq_len, 1)
    config.grad_accum_steps = 1
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    apply_overrides(config, overrides)
    validate(config)
    if config.model.vocab_size == 0:
        config.model.vocab_size = 32000

    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    optimizer = build_optimizer(config.optimizer, config.total_steps)
    layout = state_layout(config, optimizer, mesh)
    batch_sharding = NamedSharding(mesh, logical_to_mesh_spec(("batch", "seq")))
    shape = (config.global_batch_size, seq_len)
    rng = np.random.default_rng(0)

    def random_batch():
        tokens = rng.integers(0, config.model.vocab_size, size=(shape[0], shape[1] + 1)).astype(np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones(shape, np.int32) if packed else None,
                 "loss_mask": np.ones(shape, np.float32)}
        return jax.device_put(batch, batch_sharding)

    batches = [random_batch() for _ in range(2)]  # alternate two batches: no single cached input
    with jax.set_mesh(mesh):
        state = jax.jit(layout.init_fn, out_shardings=layout.shardings)(jax.random.PRNGKey(0))
        step = jit_train_step(layout, optimizer, learning_rate_schedule(config.optimizer, config.total_steps), 1,
                              batch_sharding)
        start = time.perf_counter()
        compiled = step.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - start
        wait_for_turn(turn_dir, run_id)
        for i in range(2):  # warm-up
            state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready(metrics)
        times = []
        for i in range(steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batches[i % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        if profile:
            from bench.common import device_kernels, print_kernel_table, summarize_kernels

            def one_step(batch):
                nonlocal state
                state, metrics = compiled(state, batch)
                return metrics

            title, calls = f"{config_name} T={seq_len}", 3
            kernels = device_kernels(one_step, (batches[0],), calls)  # one trace for both tables
            print_kernel_table(title + " by kind", summarize_kernels(kernels, calls, by_category=True))
            print_kernel_table(title, summarize_kernels(kernels, calls, top=25))
    step_s = float(np.median(times))
    tokens_per_sec = shape[0] * seq_len / step_s
    windows = layer_windows(config.model, seq_len)
    flops_per_token = train_flops_per_token(layout.abstract_state["params"], config.model, windows, seq_len)
    device = jax.devices()[0]
    peak = peak_flops_per_device(device)
    memory = device.memory_stats() or {}
    return {"model": config_name, "seq_len": seq_len, "batch": shape[0], "device": device.device_kind,
            "devices": jax.device_count(), "params_m": count_params(layout.abstract_state["params"]) / 1e6,
            "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
            "tokens_per_sec": tokens_per_sec,
            "mfu": tokens_per_sec * flops_per_token / (peak * jax.device_count()) if peak else 0.0,
            "peak_mem_gib": memory.get("peak_bytes_in_use", 0) / 2**30, "compile_s": compile_s,
            "loss": float(metrics["loss"]), "flops_per_token": flops_per_token,
            "impl": config.model.attention_impl, "remat": config.model.remat, "packed": packed}


def run_all(runs, args):
    """Yields each run's row (or a failed marker), in order. Up to --jobs processes compile at once; each is then
    let through to its warm-up and timed steps alone, in order, once no other process is compiling, so that the GPU
    times one step at a time and nothing else."""
    import tempfile

    turn_dir = tempfile.mkdtemp(prefix="bench_train_") if args.jobs > 1 else ""
    procs = {}

    def launch(i):
        name, seq_len = runs[i]
        config_name, *variant = name.split("@")
        command = [sys.executable, __file__, "--one", f"{config_name}:{seq_len}", "--tokens-per-step",
                   str(args.tokens_per_step), "--steps", str(args.steps), "--turn-dir", turn_dir, "--run-id", str(i)]
        command += [f"--set={s}" for s in args.set + variant] + (["--packed"] if args.packed else [])
        command += ["--profile"] if args.profile else []
        handle, log = tempfile.mkstemp(prefix=f"bench_train_{config_name}_{seq_len}_", suffix=".log")
        # A file, not a pipe: XLA's log lines must never block the child. Processes sharing the GPU allocate on
        # demand instead of each taking 75% of its memory up front.
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false") if turn_dir else None
        with os.fdopen(handle, "w") as out:
            procs[i] = (subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, env=env),
                        Path(log))

    for i in range(min(args.jobs, len(runs))):
        launch(i)
    for i, (name, seq_len) in enumerate(runs):
        proc, log = procs.pop(i)
        if turn_dir:
            # Every live process compiled first: a compile autotunes on the GPU and loads the CPU (measured: a
            # Transformer++ step timed beside NHA compiles read 149 ms median, 104 ms alone).
            waiting = [(i, proc)] + [(j, p) for j, (p, _) in procs.items()]
            while any(p.poll() is None and not Path(turn_dir, f"ready.{j}").exists() for j, p in waiting):
                time.sleep(0.2)
            Path(turn_dir, f"go.{i}").touch()
        proc.wait()
        if i + args.jobs < len(runs):
            launch(i + args.jobs)
        output = log.read_text()
        results = [line[7:] for line in output.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not results:
            print(f"{name} T={seq_len} failed (exit {proc.returncode}):\n{output[-3000:]}", flush=True)
            yield {"model": name, "seq_len": seq_len, "failed": True}
            continue
        row = dict(json.loads(results[0]), model=name)
        if args.profile:
            print("\n".join(line for line in output.splitlines() if line.startswith(("  ", "\n")) or
                            "device ms per call" in line), flush=True)
        print(json.dumps(row), flush=True)
        yield row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="nha_340m,transformer_340m",
                        help="configs/<name>.py names; name@key=value[@key=value] adds overrides to that run only")
    parser.add_argument("--seq-lens", default="2048,8192")
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--packed", action="store_true", help="feed segment ids, as packed training data does")
    parser.add_argument("--profile", action="store_true",
                        help="print each run's device time per step by kernel kind and its largest kernels")
    parser.add_argument("--out", default="", help="also write the rows as JSON lines here")
    parser.add_argument("--jobs", type=int, default=1,
                        help="compile up to N runs at once (each in its own process, all holding GPU memory); the "
                             "timed steps still run one process at a time")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: "model:seq_len" in this process
    parser.add_argument("--turn-dir", default="", help=argparse.SUPPRESS)  # internal: see wait_for_turn
    parser.add_argument("--run-id", default="", help=argparse.SUPPRESS)  # internal: see wait_for_turn
    args = parser.parse_args()

    if args.one:
        name, seq_len = args.one.split(":")
        row = measure(name, int(seq_len), args.tokens_per_step, args.steps, args.set, args.packed, args.turn_dir,
                      args.run_id, args.profile)
        print("RESULT " + json.dumps(row), flush=True)
        return

    runs = [(name, int(seq_len)) for seq_len in args.seq_lens.split(",") for name in args.models.split(",")]
    rows = list(run_all(runs, args))
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))

    width = max([18] + [len(r["model"]) + 2 for r in rows])
    print(f"\n{'model':<{width}}{'T':>6}{'batch':>6}{'step ms':>9}{'tok/s':>10}{'MFU':>7}{'peak GiB':>9}"
          f"{'compile s':>10}"
          f"{'vs TF++':>8}")
    baseline = {}  # the first Transformer++ row at each T
    for r in rows:
        if r["model"].startswith("transformer") and not r.get("failed"):
            baseline.setdefault(r["seq_len"], r["tokens_per_sec"])
    for r in rows:
        if r.get("failed"):
            print(f"{r['model']:<{width}}{r['seq_len']:>6}  failed")
            continue
        ratio = r["tokens_per_sec"] / baseline[r["seq_len"]] if r["seq_len"] in baseline else float("nan")
        print(f"{r['model']:<{width}}{r['seq_len']:>6}{r['batch']:>6}{r['step_ms']:>9.1f}{r['tokens_per_sec']:>10.0f}"
              f"{100 * r['mfu']:>6.1f}%{r['peak_mem_gib']:>9.1f}{r['compile_s']:>10.1f}{ratio:>8.2f}")
    if rows and not rows[0].get("failed"):
        print(f"device: {rows[0]['device']} x{rows[0]['devices']}")


if __name__ == "__main__":
    main()
