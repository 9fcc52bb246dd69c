"""Multi-query associative recall (MQAR, the Zoology setup): key-value pairs, then the keys again in random order;
the model must answer each repeated key with its value.

    k1 v1 k2 v2 ... kn vn | ... ki vi ... kj vj ...   (query pairs at random places among noise token 0)

Keys come from the lower half of the vocabulary, values from the upper half; only the value after a repeated key
is scored (accuracy of the argmax). The Zoology generator places queries by a power law; here they are uniform
over the query region. `mqar_batch` is also the training data of the MQAR reproduction (scripts/repro.py).
"""
from __future__ import annotations

import numpy as np

from eval.progress import progress
from eval.scoring import Scorer

NOISE = 0
DEFAULT_SETTINGS = ((8, 64), (16, 128), (32, 256), (64, 512))  # (kv pairs, sequence length)


def mqar_batch(rng: np.random.Generator, *, batch: int, num_kv: int, seq_len: int, vocab_size: int) -> dict:
    """One batch in the trainer's layout: inputs, targets [B, seq_len] int32, loss_mask [B, seq_len] float32 (1 on
    the positions whose target is a queried value), segment_ids [B, seq_len] int32 (one document per row)."""
    half = vocab_size // 2
    if num_kv > half - 1:
        raise ValueError(f"num_kv={num_kv} needs more distinct keys than vocab_size={vocab_size} has; use at most "
                         f"{half - 1} pairs or a larger vocabulary.")
    query_slots = (seq_len + 1 - 2 * num_kv) // 2
    if query_slots < num_kv:
        raise ValueError(f"seq_len={seq_len} is too short for {num_kv} pairs and their queries; use seq_len >= "
                         f"{4 * num_kv}.")
    sequences = np.full((batch, seq_len + 1), NOISE, np.int32)
    scored = np.zeros((batch, seq_len + 1), bool)
    for row in range(batch):
        keys = rng.choice(np.arange(1, half), size=num_kv, replace=False)
        values = rng.integers(half, vocab_size, size=num_kv)
        sequences[row, 0:2 * num_kv:2], sequences[row, 1:2 * num_kv:2] = keys, values
        order = rng.permutation(num_kv)
        starts = 2 * num_kv + 2 * np.sort(rng.choice(query_slots, size=num_kv, replace=False))
        sequences[row, starts], sequences[row, starts + 1] = keys[order], values[order]
        scored[row, starts] = True  # the prediction made at the query key is the value
    return {"inputs": sequences[:, :-1], "targets": sequences[:, 1:], "loss_mask": scored[:, :-1].astype(np.float32),
            "segment_ids": np.ones((batch, seq_len), np.int32)}


def recall_accuracy(scorer: Scorer, rng: np.random.Generator, *, num_kv: int, seq_len: int, vocab_size: int,
                    samples: int, batch_size: int) -> float:
    """Fraction of queried values the model predicts exactly (argmax), over `samples` sequences."""
    correct = total = 0
    for _ in range(-(-samples // batch_size)):
        data = mqar_batch(rng, batch=batch_size, num_kv=num_kv, seq_len=seq_len, vocab_size=vocab_size)
        tokens = np.concatenate([data["inputs"], data["targets"][:, -1:]], axis=1)
        _, greedy = scorer.next_token_logprobs(tokens)
        mask = data["loss_mask"] > 0
        correct += int(np.sum(greedy & mask))
        total += int(np.sum(mask))
    return correct / total


def run(loaded, *, settings=DEFAULT_SETTINGS, samples: int = 256, batch_size: int = 16, seed: int = 0) -> dict:
    """Recall accuracy per (kv pairs, length): {"<kv>x<len>": {"num_kv", "seq_len", "accuracy", "samples"}}.
    Lengths beyond the train length score with the full layers widened (eval.scoring.model_for_context)."""
    scorer = Scorer.of(loaded)
    rng = np.random.default_rng(seed)
    results = {}
    for num_kv, seq_len in progress(settings, desc="mqar", unit="setting"):
        accuracy = recall_accuracy(scorer, rng, num_kv=num_kv, seq_len=seq_len,
                                   vocab_size=loaded.config.model.vocab_size, samples=samples, batch_size=batch_size)
        results[f"{num_kv}x{seq_len}"] = {"num_kv": num_kv, "seq_len": seq_len, "accuracy": accuracy,
                                          "samples": samples}
    return results


def table(results: dict) -> str:
    lines = ["| kv pairs | length | accuracy |", "|---|---|---|"]
    lines += [f"| {r['num_kv']} | {r['seq_len']} | {r['accuracy']:.3f} |" for r in results.values()]
    return "\n".join(lines)
