"""Passkey retrieval (needle in a haystack, RULER-style length extrapolation): a 5-digit number hidden at a depth of
repeated filler text, asked for at the end; greedy generation through the decode cache must reproduce it.

Lengths run from the train length to 8x beyond it; accuracy per (length, depth), plus a heatmap PNG.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.progress import progress
from nha_jax.generation import generate

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_LENGTH_FACTORS = (1, 2, 4, 8)


def passkey_prompt(tokenizer, *, length: int, depth: float, key: int, add_bos: bool) -> list[int]:
    """Exactly `length` tokens: [BOS] filler, the needle at `depth` (0 = start, 1 = end) of the filler, question."""
    head = [tokenizer.bos_id] if add_bos else []
    needle, question = tokenizer.encode(NEEDLE.format(key=key)), tokenizer.encode(QUESTION)
    filler_len = length - len(head) - len(needle) - len(question)
    if filler_len < 0:
        raise ValueError(f"length={length} cannot hold the needle and question ({len(needle) + len(question)} "
                         "tokens); use longer lengths.")
    unit = tokenizer.encode(FILLER)
    filler = (unit * (filler_len // len(unit) + 1))[:filler_len]
    cut = int(round(depth * filler_len))
    return head + filler[:cut] + needle + filler[cut:] + question


def run(loaded, *, lengths=None, depths=DEFAULT_DEPTHS, samples: int = 4, seed: int = 0,
        plot_dir: str | None = None) -> dict:
    """Accuracy per (length, depth): {"<length>@<depth>": {"length", "depth", "accuracy", "samples"}}, and a
    heatmap passkey.png in plot_dir. lengths defaults to the train length times 1, 2, 4, 8."""
    tokenizer, config = loaded.tokenizer, loaded.config
    lengths = lengths or [config.seq_len * f for f in DEFAULT_LENGTH_FACTORS]
    rng = np.random.default_rng(seed)
    answer_tokens = len(tokenizer.encode(" 12345")) + 1
    results = {}
    for length in progress(lengths, desc="passkey", unit="length"):
        for depth in depths:
            keys = rng.integers(10000, 100000, size=samples)
            prompts = [passkey_prompt(tokenizer, length=length, depth=depth, key=int(key),
                                      add_bos=config.data.add_bos) for key in keys]
            output = generate(loaded.model, prompts, seq_len=config.seq_len, max_new_tokens=answer_tokens,
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
            answers = [tokenizer.decode(row[:n].tolist()).strip() for row, n in zip(output.tokens, output.lengths)]
            correct = [answer.startswith(str(key)) for answer, key in zip(answers, keys)]
            results[f"{length}@{depth}"] = {"length": length, "depth": depth, "accuracy": float(np.mean(correct)),
                                            "samples": samples, "example_answer": answers[0]}
    if plot_dir:
        plot(results, Path(plot_dir) / "passkey.png", train_len=config.seq_len)
    return results


def plot(results: dict, path: Path, *, train_len: int) -> None:
    """Heatmap of accuracy: depth (rows) by length (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in results.values()})
    depths = sorted({r["depth"] for r in results.values()})
    grid = np.array([[results[f"{n}@{d}"]["accuracy"] for n in lengths] for d in depths])
    figure, axes = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    image = axes.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    axes.set_xticks(range(len(lengths)), [f"{n}\n({n / train_len:g}x)" for n in lengths])
    axes.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    axes.set_xlabel("context length (tokens; x train length)")
    axes.set_ylabel("needle depth")
    figure.colorbar(image, label="accuracy")
    axes.set_title("passkey retrieval")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def table(results: dict) -> str:
    lengths = sorted({r["length"] for r in results.values()})
    depths = sorted({r["depth"] for r in results.values()})
    lines = ["| depth \\ length | " + " | ".join(str(n) for n in lengths) + " |",
             "|---" * (len(lengths) + 1) + "|"]
    lines += [f"| {d:.0%} | " + " | ".join(f"{results[f'{n}@{d}']['accuracy']:.2f}" for n in lengths) + " |"
              for d in depths]
    return "\n".join(lines)
