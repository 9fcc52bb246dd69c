"""Generate text from a trained checkpoint, and the checkpoint loader that eval/ shares.

    python -m nha_jax.generate --workdir runs/default --prompt "def main(" [--prompt ...] [--step N]
        [--max-new-tokens 128] [--temperature 0.8 --top-k 50 --top-p 0.95] [--seed 0]
        [--config configs/default.py --config.key=value ...]

The run's config comes from <workdir>/config.json when the workdir has one, else from --config (the file the run
was trained with, plus the same overrides).
"""
from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

import jax
import ml_collections
from flax import nnx

from nha_jax.training.config import run_config


class LoadedModel(NamedTuple):
    """A restored checkpoint: the model, its (vocab-resolved) config, the tokenizer and the step it was saved at."""
    model: nnx.Module
    config: ml_collections.ConfigDict
    tokenizer: object
    step: int


def load_model(workdir: str, *, step: int | None = None, config: ml_collections.ConfigDict | None = None
               ) -> LoadedModel:
    """Restores the parameters of checkpoint `step` (default: the latest) of a training workdir onto one device.

    config: the run's config (default: run_config(workdir)).
    """
    from nha_jax import data
    from nha_jax.sharding import make_mesh
    from nha_jax.training.checkpoint import Checkpointer
    from nha_jax.training.loop import resolve_vocab_size
    from nha_jax.training.optimizer import build_optimizer
    from nha_jax.training.state import state_layout

    config = ml_collections.ConfigDict((config or run_config(workdir)).to_dict())
    resolve_vocab_size(config)
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, async_save=False)
    try:
        available = list(checkpointer.manager.all_steps())
        if step is None:
            step = checkpointer.latest_step()
        if step is None or step not in available:
            raise ValueError(f"--step={step}: {workdir}/checkpoints holds steps {sorted(available)}; pick one of "
                             "them (or train first).")
        # The checkpoint holds the whole train state; the optimizer's tree is only needed as the restore target.
        layout = state_layout(config, build_optimizer(config.optimizer, config.total_steps),
                              make_mesh(1, 1, 1, devices=jax.devices()[:1]))
        state, _ = checkpointer.restore(step, layout.abstract_with_shardings())
    finally:
        checkpointer.close()
    model = nnx.merge(layout.graphdef, state["params"])
    return LoadedModel(model=model, config=config, tokenizer=data.build_tokenizer(config.data), step=int(step))


def main(argv: list[str]) -> int:
    from nha_jax.generation import generate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the training run's workdir")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--config", default=None, help="the run's config file, when the workdir has no config.json")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = no nucleus cut")
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if not o.startswith("--config.")]
    if unknown:
        parser.error(f"unknown arguments {unknown}; config overrides look like --config.key=value.")

    try:
        loaded = load_model(args.workdir, step=args.step, config=run_config(args.workdir, args.config, overrides))
        tokenizer = loaded.tokenizer
        add_bos = loaded.config.data.add_bos
        prompts = [([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(text) for text in args.prompt]
        result = generate(loaded.model, prompts, seq_len=loaded.config.seq_len, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for text, tokens, length in zip(args.prompt, result.tokens, result.lengths):
        print(f"[step {loaded.step}] {text}{tokenizer.decode(tokens[:length].tolist())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
