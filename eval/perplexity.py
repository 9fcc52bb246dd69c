"""Perplexity of text files: the tokens cut into rows of `context` tokens, every token after a row's first scored.

Rows are non-overlapping, so each token sees on average half a context: the usual, slightly pessimistic, estimate.
Bits per byte divides the summed loss by the file's UTF-8 bytes, comparable across tokenizers.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from eval.scoring import Scorer
from eval.progress import progress


def perplexity_of_tokens(scorer: Scorer, tokens: np.ndarray, *, context: int, batch_size: int) -> dict:
    """tokens [N] int -> {"nll_sum", "scored_tokens", "nll_per_token", "perplexity"} over N // context rows."""
    rows = len(tokens) // context
    if rows == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one context of {context}; use a longer "
                         "file or a smaller --context.")
    matrix = tokens[:rows * context].reshape(rows, context)
    nll_sum = 0.0
    for start in progress(range(0, rows, batch_size), desc="perplexity", unit="batch"):
        batch = matrix[start:start + batch_size]
        real = len(batch)
        if real < batch_size:  # a fixed batch shape compiles once; the filler rows are not counted
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        logprobs, _ = scorer.next_token_logprobs(batch)
        nll_sum -= float(np.sum(logprobs[:real], dtype=np.float64))
    scored = rows * (context - 1)
    return {"nll_sum": nll_sum, "scored_tokens": scored, "nll_per_token": nll_sum / scored,
            "perplexity": math.exp(nll_sum / scored)}


def run(loaded, *, files: list[str], context: int | None = None, batch_size: int = 8,
        max_tokens: int | None = None) -> dict:
    """Perplexity of each text file under loaded.model (a generate.LoadedModel); context defaults to the train
    length. max_tokens keeps the first tokens of each file only (quick looks, tests).
    Returns {file name: {perplexity, nll_per_token, bits_per_byte, scored_tokens, nll_sum, context}}."""
    context = context or loaded.config.seq_len
    scorer = Scorer.of(loaded)
    results = {}
    for name in files:
        text = Path(name).read_text(encoding="utf-8")
        all_tokens = np.asarray(loaded.tokenizer.encode(text), np.int32)
        scores = perplexity_of_tokens(scorer, all_tokens[:max_tokens], context=context, batch_size=batch_size)
        # Bytes of the scored stretch of text, pro rata when only part of the file was scored.
        scored_bytes = len(text.encode("utf-8")) * scores["scored_tokens"] / len(all_tokens)
        scores.update(bits_per_byte=scores["nll_sum"] / math.log(2) / scored_bytes, context=context)
        results[Path(name).name] = scores
    return results


def table(results: dict) -> str:
    lines = ["| file | perplexity | nll/token | bits/byte | tokens | context |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['perplexity']:.3f} | {r['nll_per_token']:.4f} | {r['bits_per_byte']:.4f} | "
              f"{r['scored_tokens']} | {r['context']} |" for name, r in results.items()]
    return "\n".join(lines)
