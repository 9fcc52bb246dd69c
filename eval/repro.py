"""The small-scale reproduction: trains NHA, GSA, sliding window and Transformer++ (configs/repro.py, same budget)
on MQAR and on text, then evaluates recall, perplexity and decode efficiency; writes <out>/repro.json and a table.

    python eval/repro.py [--out runs/repro] [--tasks mqar,text] [--variants nha,gsa,swa,transformer]
                         [--mqar-steps 300] [--text-steps 300] [--jobs 1] [--plot out.png]
    python eval/repro.py --tasks none --report docs/repro.json --plot docs/repro.png   (plot an existing report)

MQAR trains on sequences of 256 tokens with 4..64 key-value pairs per batch (the trainer's jitted step, fed by
eval.mqar.mqar_batch); text trains with the ordinary trainer on WikiText-2 valid and is scored on WikiText-2 test.
--jobs N runs N of the (task, variant) runs at once, each in its own process with 1/N of the accelerator's memory.
Their compiles and host work overlap on the host's cores; their kernels do not: processes share one GPU by time
slices, so the GPU time of the steps adds up as if the runs were one after another.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
MQAR_LEN, MQAR_BATCH, MQAR_KV = 256, 64, (4, 8, 16, 32, 64)
MQAR_EVAL = ((8, 256), (16, 256), (32, 256), (64, 256), (32, 512), (64, 1024))


def variant_config(variant: str, task: str, out: Path, steps: int, overrides=()):
    from configs import repro
    from nha_jax.training import apply_overrides, load_config_file

    config = apply_overrides(load_config_file(str(REPO / "configs" / "repro.py")),
                             repro.VARIANTS[variant] + list(overrides))
    config.workdir = str(out / f"{variant}_{task}")
    config.total_steps = steps
    if task == "mqar":
        config.seq_len, config.global_batch_size = MQAR_LEN, MQAR_BATCH
    return config


def train_mqar(config, seed: int = 0) -> dict:
    """The trainer's jitted step on MQAR batches; saves the final checkpoint. Returns {loss, seconds}."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from eval.mqar import mqar_batch
    from nha_jax.training.config import save_run_config
    from nha_jax.sharding import logical_to_mesh_spec, make_mesh
    from nha_jax.training.checkpoint import Checkpointer
    from nha_jax.training.loop import resolve_vocab_size
    from nha_jax.training.optimizer import build_optimizer, learning_rate_schedule
    from nha_jax.training.state import state_layout
    from nha_jax.training.step import jit_train_step

    resolve_vocab_size(config)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    optimizer = build_optimizer(config.optimizer, config.total_steps)
    layout = state_layout(config, optimizer, mesh)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        step_fn = jit_train_step(layout, optimizer, learning_rate_schedule(config.optimizer, config.total_steps), 1,
                                 NamedSharding(mesh, logical_to_mesh_spec(("batch", "seq"))))
        state = jax.jit(layout.init_fn, out_shardings=layout.shardings)(jax.random.PRNGKey(config.seed))
        for _ in range(config.total_steps):
            batch = mqar_batch(rng, batch=config.global_batch_size, num_kv=int(rng.choice(MQAR_KV)),
                               seq_len=config.seq_len, vocab_size=config.model.vocab_size)
            state, metrics = step_fn(state, batch)
        loss = float(metrics["loss"])
    checkpointer = Checkpointer(config.workdir, keep=1, async_save=False)
    checkpointer.save(config.total_steps, state, {})
    checkpointer.wait()
    checkpointer.close()
    save_run_config(config.workdir, config)
    return {"final_loss": loss, "train_seconds": time.perf_counter() - start}


def train_text(config) -> dict:
    from nha_jax.training.config import save_run_config
    from nha_jax.training import train

    start = time.perf_counter()
    summary = train(config)
    save_run_config(config.workdir, config)
    return {"final_loss": summary.get("final_loss"), "tokens_per_sec": summary.get("tokens_per_sec"),
            "train_seconds": time.perf_counter() - start}


def run_in_processes(common_args, runs, jobs: int, report_file: Path) -> dict:
    """Runs each (task, variant) of `runs` as `repro.py common_args --tasks task --variants variant --report <its
    own file>`, `jobs` at a time, each with 1/jobs of the accelerator's memory. Returns {task: {variant: row}}."""
    import os
    import subprocess

    # Unbuffered: a run cut short (a time limit) still leaves its progress in the log.
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / jobs:.3f}", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONUNBUFFERED="1")
    pending, running, rows, start = list(runs), [], {}, time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            task, variant = pending.pop(0)
            row_file = report_file.parent / "rows" / f"{task}_{variant}.json"
            row_file.unlink(missing_ok=True)
            command = [sys.executable, __file__, *common_args, "--jobs", "1", "--tasks", task, "--variants", variant,
                       "--report", str(row_file)]
            running.append((subprocess.Popen(command, env=env), row_file, task, variant))
        time.sleep(1)
        for entry in [e for e in running if e[0].poll() is not None]:
            running.remove(entry)
            process, row_file, task, variant = entry
            if process.returncode:
                raise SystemExit(f"the {task} run of {variant} failed (exit {process.returncode}); its output is above.")
            rows[task, variant] = json.loads(row_file.read_text())[task][variant]
            print(f"[{time.perf_counter() - start:.0f} s] {task} {variant} done: {json.dumps(rows[task, variant])}",
                  flush=True)
    report = {}
    for task, variant in runs:  # in the order asked for, not the order they finished
        report.setdefault(task, {})[variant] = rows[task, variant]
    return report


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/repro")
    parser.add_argument("--tasks", default="mqar,text")
    parser.add_argument("--variants", default="nha,gsa,swa,transformer")
    parser.add_argument("--mqar-steps", type=int, default=300)
    parser.add_argument("--text-steps", type=int, default=300)
    parser.add_argument("--mqar-samples", type=int, default=256, help="eval sequences per MQAR setting")
    parser.add_argument("--text-eval-tokens", type=int, default=512 * 16 * 16, help="wikitext-2 test tokens scored")
    parser.add_argument("--set", action="append", default=[], help="config override for every run, key=value")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--report", default=None, help="the JSON report to update (default <out>/repro.json)")
    parser.add_argument("--plot", default=None, help="draw the report's recall and perplexity to this PNG; with "
                        "--tasks none, only plot an existing report")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.tasks == "none":
        report_file = Path(args.report) if args.report else Path(args.out) / "repro.json"
        if not report_file.is_file() or not args.plot:
            parser.error(f"--tasks none needs --plot and an existing report; {report_file} is not a file")
        plot(json.loads(report_file.read_text()), args.plot)
        return

    from eval import mqar, perplexity
    from nha_jax.generate import load_model
    from nha_jax.training.state import count_params
    from flax import nnx

    out = Path(args.out)
    report_file = Path(args.report) if args.report else out / "repro.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    runs = [(task, variant) for task in args.tasks.split(",") for variant in args.variants.split(",")]
    if args.jobs > 1:
        common = ["--out", args.out, "--mqar-steps", str(args.mqar_steps), "--text-steps", str(args.text_steps),
                  "--mqar-samples", str(args.mqar_samples), "--text-eval-tokens", str(args.text_eval_tokens)]
        common += [item for override in args.set for item in ("--set", override)]
        for task, rows in run_in_processes(common, runs, args.jobs, report_file).items():
            report.setdefault(task, {}).update(rows)
        report_file.parent.mkdir(parents=True, exist_ok=True)
        report_file.write_text(json.dumps(report, indent=2))
        print(table(report))
        if args.plot:
            plot(report, args.plot)
        return
    for task, variant in runs:
        steps = args.mqar_steps if task == "mqar" else args.text_steps
        config = variant_config(variant, task, out, steps, args.set)
        shutil.rmtree(config.workdir, ignore_errors=True)  # a fresh run: the trainer would resume an old one
        row = train_mqar(config) if task == "mqar" else train_text(config)
        loaded = load_model(config.workdir)
        row["params_m"] = count_params(nnx.state(loaded.model, nnx.Param)) / 1e6
        if task == "mqar":
            row["recall"] = {key: r["accuracy"] for key, r in
                             mqar.run(loaded, settings=MQAR_EVAL, samples=args.mqar_samples,
                                      batch_size=min(64, args.mqar_samples)).items()}
        else:
            wiki = REPO.parent / "shared" / "data" / "wikitext-2" / "test.txt"
            ppl = perplexity.run(loaded, files=[str(wiki)], batch_size=16, max_tokens=args.text_eval_tokens)
            row.update(perplexity=ppl["test.txt"]["perplexity"], bits_per_byte=ppl["test.txt"]["bits_per_byte"])
        report.setdefault(task, {})[variant] = row
        report_file.parent.mkdir(parents=True, exist_ok=True)
        report_file.write_text(json.dumps(report, indent=2))
        print(f"{task} {variant}: {json.dumps(row)}", flush=True)
    print(table(report))
    if args.plot:
        plot(report, args.plot)


def plot(report: dict, path: str) -> None:
    """One PNG: MQAR recall per setting (grouped bars, one colour per variant) and WikiText-2 test perplexity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [task for task in ("mqar", "text") if task in report]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, task in zip(axes[0], panels):
        rows = report[task]
        if task == "mqar":
            settings = list(next(iter(rows.values()))["recall"])
            width = 0.8 / len(rows)
            for i, (variant, row) in enumerate(rows.items()):
                ax.bar(np.arange(len(settings)) + i * width, [row["recall"][s] for s in settings], width, label=variant)
            ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings)
            ax.set(xlabel="key-value pairs x length", ylabel="recall", title="MQAR recall (higher is better)")
            ax.legend()
        else:
            ax.bar(list(rows), [row["perplexity"] for row in rows.values()], color=[f"C{i}" for i in range(len(rows))])
            low = min(row["perplexity"] for row in rows.values())
            ax.set_ylim(low * 0.95, max(row["perplexity"] for row in rows.values()) * 1.02)
            ax.set(ylabel="byte perplexity", title="WikiText-2 test perplexity (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def table(report: dict) -> str:
    lines = []
    if "mqar" in report:
        settings = list(next(iter(report["mqar"].values()))["recall"])
        lines += ["| MQAR recall | params | " + " | ".join(settings) + " | final loss | train s |",
                  "|---" * (len(settings) + 4) + "|"]
        lines += [f"| {v} | {r['params_m']:.1f}M | " + " | ".join(f"{r['recall'][s]:.3f}" for s in settings)
                  + f" | {r['final_loss']:.3f} | {r['train_seconds']:.0f} |" for v, r in report["mqar"].items()]
    if "text" in report:
        lines += ["", "| text | params | wikitext-2 test ppl (bytes) | bits/byte | train tokens/s | final loss |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {v} | {r['params_m']:.1f}M | {r['perplexity']:.3f} | {r['bits_per_byte']:.3f} | "
                  f"{r['tokens_per_sec'] or 0:.0f} | {r['final_loss']:.3f} |" for v, r in report["text"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
