"""Training throughput: tokens/s, MFU and peak device memory of the real train step (forward, backward, AdamW),
NHA-340M against Transformer++-340M, at several sequence lengths, in one run.

    python bench/bench_train.py [--models nha_340m,transformer_340m] [--seq-lens 2048,8192]
                                [--tokens-per-step 16384] [--steps 10] [--set model.remat=full ...]

Each (model, T) runs in its own subprocess so that its peak memory is its own. Batches are random tokens, one
document per row (so full-window layers really attend over T) and no segment ids, so that the Transformer++ full
layers take cuDNN flash attention (`impl="auto"` routes there only without segments); `--packed` passes segment ids
(all ones) as the trainer does with packed data. MFU uses the FLOP count of docs/TRAINING.md.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(config_name: str, seq_len: int, tokens_per_step: int, steps: int, overrides: list[str],
            packed: bool) -> dict:
    """Compiles and times the train step of configs/<config_name>.py at seq_len; returns one result row."""
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
        for i in range(2):  # warm-up
            state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready(metrics)
        times = []
        for i in range(steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batches[i % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="nha_340m,transformer_340m")
    parser.add_argument("--seq-lens", default="2048,8192")
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--packed", action="store_true", help="feed segment ids, as packed training data does")
    parser.add_argument("--out", default="", help="also write the rows as JSON lines here")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: "model:seq_len" in this process
    args = parser.parse_args()

    if args.one:
        name, seq_len = args.one.split(":")
        print("RESULT " + json.dumps(measure(name, int(seq_len), args.tokens_per_step, args.steps, args.set, args.packed)))
        return

    rows = []
    for seq_len in [int(s) for s in args.seq_lens.split(",")]:
        for name in args.models.split(","):
            command = [sys.executable, __file__, "--one", f"{name}:{seq_len}", "--tokens-per-step",
                       str(args.tokens_per_step), "--steps", str(args.steps)] + [f"--set={s}" for s in args.set]
            command += ["--packed"] if args.packed else []
            done = subprocess.run(command, capture_output=True, text=True)
            results = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not results:
                print(f"{name} T={seq_len} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", flush=True)
                rows.append({"model": name, "seq_len": seq_len, "failed": True})
                continue
            rows.append(json.loads(results[0]))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))

    print(f"\n{'model':<18}{'T':>6}{'batch':>6}{'step ms':>9}{'tok/s':>10}{'MFU':>7}{'peak GiB':>9}{'compile s':>10}"
          f"{'vs TF++':>8}")
    baseline = {r["seq_len"]: r["tokens_per_sec"] for r in rows if r["model"].startswith("transformer")
                and not r.get("failed")}
    for r in rows:
        if r.get("failed"):
            print(f"{r['model']:<18}{r['seq_len']:>6}  failed")
            continue
        ratio = r["tokens_per_sec"] / baseline[r["seq_len"]] if r["seq_len"] in baseline else float("nan")
        print(f"{r['model']:<18}{r['seq_len']:>6}{r['batch']:>6}{r['step_ms']:>9.1f}{r['tokens_per_sec']:>10.0f}"
              f"{100 * r['mfu']:>6.1f}%{r['peak_mem_gib']:>9.1f}{r['compile_s']:>10.1f}{ratio:>8.2f}")
    if rows and not rows[0].get("failed"):
        print(f"device: {rows[0]['device']} x{rows[0]['devices']}")


if __name__ == "__main__":
    main()
