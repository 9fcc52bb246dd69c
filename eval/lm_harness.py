"""lm-evaluation-harness model class for nha-jax checkpoints, registered as "nha-jax", so every lm-eval task runs
on our models:

    lm_eval --model nha-jax --model_args workdir=runs/x,step=300 --tasks lambada_openai   (after `import eval.lm_harness`)
    python eval/run.py --workdir runs/x --tasks lm_eval --lm-eval-tasks lambada_openai

Needs the `eval` extra (pip install 'nha-jax[eval]'). Sequences longer than the train length keep their last
`max_length` tokens (default: the train length), as lm-eval's own models do.
"""
from __future__ import annotations

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from eval.progress import progress
from eval.scoring import Scorer
from nha_jax.generation import generate


@register_model("nha-jax")
class NHALM(LM):
    """loglikelihood, loglikelihood_rolling and generate_until over a loaded checkpoint (nha_jax.generate)."""

    def __init__(self, loaded=None, *, workdir: str | None = None, step: int | None = None, batch_size: int = 8,
                 max_length: int | None = None, **_):
        super().__init__()
        if loaded is None:
            if workdir is None:
                raise ValueError("model_args needs workdir=<training workdir> (and optionally step=N).")
            from nha_jax.generate import load_model
            loaded = load_model(workdir, step=None if step is None else int(step))
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.scorer = Scorer.of(loaded)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or loaded.config.seq_len)
        # Every row starts with one token so that a text's first token is scored too (EOS when the model was
        # trained without BOS: documents then followed an EOS).
        self.prefix = [self.tokenizer.bos_id if loaded.config.data.add_bos else self.tokenizer.eos_id]

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "NHALM":
        args = dict(item.split("=", 1) for item in arg_string.split(",") if item)
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"})
        return cls(**args)

    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        """(context tokens, continuation tokens) -> (sum log p(continuation | context), all greedy) per pair.

        Rows are right-padded to the batch's longest (a causal model never looks right), bucketed to powers of two
        so that few shapes compile.
        """
        results = []
        for start in progress(range(0, len(pairs), self.batch_size), desc=desc, unit="batch"):
            chunk = pairs[start:start + self.batch_size]
            rows = [(self.prefix + context + continuation)[-(self.max_length + 1):] for context, continuation in chunk]
            width = min(max(2, 1 << (max(len(r) for r in rows) - 1).bit_length()), self.max_length + 1)
            tokens = np.full((self.batch_size, width), self.tokenizer.pad_id, np.int32)
            for i, row in enumerate(rows):
                tokens[i, :len(row)] = row
            logprobs, greedy = self.scorer.next_token_logprobs(tokens)
            for i, (row, (_, continuation)) in enumerate(zip(rows, chunk)):
                # Target t + 1 is predicted at t: the continuation's targets are the row's last n tokens.
                span = slice(len(row) - 1 - len(continuation), len(row) - 1)
                results.append((float(np.sum(logprobs[i, span], dtype=np.float64)), bool(np.all(greedy[i, span]))))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Requests with args (context, continuation) -> (log p(continuation | context), is greedy)."""
        pairs = []
        for request in requests:
            context, continuation = request.args
            # A leading space belongs to the continuation's first token, as lm-eval's HF model splits it.
            spaces = len(context) - len(context.rstrip())
            context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
            pairs.append((self.tokenizer.encode(context), self.tokenizer.encode(continuation)))
        return self._score(pairs, "loglikelihood")

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Requests with args (text,) -> log p(text), in disjoint windows of max_length tokens (each window after
        the first conditioned on nothing but itself: the usual non-overlapping estimate)."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            tokens = self.tokenizer.encode(request.args[0])
            for start in range(0, len(tokens), self.max_length):
                windows.append(([], tokens[start:start + self.max_length]))
                owners.append(index)
        totals = np.zeros(len(requests))
        for owner, (logprob, _) in zip(owners, self._score(windows, "loglikelihood_rolling")):
            totals[owner] += logprob
        return totals.tolist()

    def generate_until(self, requests) -> list[str]:
        """Requests with args (context, {"until": [...], "max_gen_toks": n, ...}) -> greedy continuations cut at
        the first stop string."""
        outputs = []
        for request in progress(requests, desc="generate_until", unit="request"):
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 64))
            prompt = (self.prefix + self.tokenizer.encode(context))[-self.max_length:]
            result = generate(self.loaded.model, [prompt], seq_len=self.loaded.config.seq_len,
                              max_new_tokens=max_new, temperature=float(gen_kwargs.get("temperature", 0.0)),
                              eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
            text = self.tokenizer.decode(result.tokens[0, :result.lengths[0]].tolist())
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def evaluate(loaded, *, tasks: list[str], include_path: str | None = None, limit: int | None = None,
             batch_size: int = 8, include_defaults: bool = True) -> dict:
    """Runs lm-eval tasks on a loaded checkpoint: {task: {metric: value}} (lm-eval's "results" section).

    include_path: a folder of extra task YAMLs; include_defaults=False indexes only those (lm-eval's own ~200
    task folders take seconds to index)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    output = simple_evaluate(model=NHALM(loaded, batch_size=batch_size), tasks=tasks, limit=limit,
                             task_manager=TaskManager(include_path=include_path, include_defaults=include_defaults), log_samples=False,
                             bootstrap_iters=0)
    return {task: {metric: value for metric, value in metrics.items() if isinstance(value, (int, float))}
            for task, metrics in output["results"].items()}


def table(results: dict) -> str:
    lines = ["| task | metric | value |", "|---|---|---|"]
    lines += [f"| {task} | {metric} | {value:.4f} |" for task, metrics in results.items()
              for metric, value in metrics.items()]
    return "\n".join(lines)
