"""Evaluate a training run's checkpoint on the named tasks; results go to a JSON file keyed by checkpoint step, a
markdown table to stdout and PNG plots beside the JSON.

    python eval/run.py --workdir runs/default [--step N] --tasks perplexity,mqar,passkey,efficiency[,lm_eval]
        [--out runs/default/eval/results.json] [--config configs/default.py --config.key=value ...]

Tasks and their options are described in docs/EVAL.md. Exit codes: 0 done, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"
TASKS = ("perplexity", "mqar", "passkey", "efficiency", "lm_eval")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _settings(text: str) -> list[tuple[int, int]]:
    pairs = [item.split("x") for item in text.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"--mqar-settings={text!r}: write kv pairs x length, e.g. 8x64,16x128.")
    return [(int(kv), int(length)) for kv, length in pairs]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the training run's workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--tasks", default="perplexity,mqar,passkey,efficiency", help=f"comma list of {TASKS}")
    parser.add_argument("--out", default=None, help="results JSON (default <workdir>/eval/results.json)")
    parser.add_argument("--config", default=None, help="the run's config file, when the workdir has no config.json")
    parser.add_argument("--text-file", action="append", default=None, help="perplexity text file (repeatable)")
    parser.add_argument("--context", type=int, default=None, help="perplexity context (default: train length)")
    parser.add_argument("--max-tokens", type=int, default=None, help="perplexity: score only the first N tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mqar-settings", type=_settings, default=None, help="e.g. 8x64,16x128,32x256")
    parser.add_argument("--mqar-samples", type=int, default=256)
    parser.add_argument("--passkey-lengths", type=_ints, default=None, help="default: train length x 1,2,4,8")
    parser.add_argument("--passkey-depths", type=_floats, default=None, help="default: 0,0.25,0.5,0.75,1")
    parser.add_argument("--passkey-samples", type=int, default=4)
    parser.add_argument("--contexts", type=_ints, default=None, help="efficiency contexts (default: x1,2,4)")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--lm-eval-tasks", default="", help="lm-eval task names, comma separated")
    parser.add_argument("--lm-eval-include", default=None, help="folder of extra lm-eval task YAMLs")
    parser.add_argument("--lm-eval-limit", type=int, default=None, help="examples per lm-eval task")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if not o.startswith("--config.")]
    if unknown:
        parser.error(f"unknown arguments {unknown}; config overrides look like --config.key=value.")
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        parser.error(f"--tasks: unknown {bad}; choose from {TASKS}.")
    if "lm_eval" in tasks and not args.lm_eval_tasks:
        parser.error("--tasks lm_eval needs --lm-eval-tasks (e.g. lambada_openai or a task of --lm-eval-include).")
    args.tasks = tasks
    return args, overrides


def run_task(name: str, loaded, args, plot_dir: Path) -> tuple[dict, str]:
    """Runs one task; returns (results, markdown table)."""
    if name == "perplexity":
        from eval import perplexity
        results = perplexity.run(loaded, files=args.text_file or [str(DEFAULT_TEXT)], context=args.context,
                                 batch_size=args.batch_size, max_tokens=args.max_tokens)
        return results, perplexity.table(results)
    if name == "mqar":
        from eval import mqar
        results = mqar.run(loaded, settings=args.mqar_settings or mqar.DEFAULT_SETTINGS, samples=args.mqar_samples,
                           batch_size=args.batch_size)
        return results, mqar.table(results)
    if name == "passkey":
        from eval import passkey
        results = passkey.run(loaded, lengths=args.passkey_lengths, depths=args.passkey_depths or
                              passkey.DEFAULT_DEPTHS, samples=args.passkey_samples, plot_dir=str(plot_dir))
        return results, passkey.table(results)
    if name == "efficiency":
        from eval import efficiency
        results = efficiency.run(loaded, contexts=args.contexts, decode_steps=args.decode_steps)
        efficiency.plot(results, plot_dir / "efficiency.png")
        return results, efficiency.table(results)
    from eval import lm_harness
    results = lm_harness.evaluate(loaded, tasks=args.lm_eval_tasks.split(","), include_path=args.lm_eval_include,
                                  limit=args.lm_eval_limit, batch_size=args.batch_size)
    return results, lm_harness.table(results)


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    from nha_jax.generate import load_model, run_config

    try:
        loaded = load_model(args.workdir, step=args.step, config=run_config(args.workdir, args.config, overrides))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.workdir) / "eval" / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    everything = json.loads(out.read_text()) if out.is_file() else {}
    step_results = everything.setdefault(str(loaded.step), {})
    print(f"# eval of {args.workdir} at step {loaded.step}\n")
    for name in args.tasks:
        results, table = run_task(name, loaded, args, out.parent)
        step_results[name] = results
        out.write_text(json.dumps(everything, indent=2, sort_keys=True))  # after every task: a crash keeps the rest
        print(f"## {name}\n\n{table}\n", flush=True)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
