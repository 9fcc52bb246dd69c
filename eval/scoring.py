"""Log-probabilities of token sequences under a model, in one jitted forward per batch shape."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nha_jax.model import LanguageModel


def model_for_context(model: LanguageModel, model_cfg: ml_collections.ConfigDict, train_len: int,
                      context: int) -> LanguageModel:
    """The same weights with every full layer (window >= train_len) widened to `context` tokens.

    A full layer attended to everything in training; scored on longer texts it must keep attending to everything
    (as generation's KV cache does), not slide a train-length window. NHA layers keep their window.
    """
    if context <= train_len:
        return model
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    if cfg.windows:
        cfg.windows = tuple(context if int(w) >= train_len else int(w) for w in cfg.windows)
    widened = nnx.eval_shape(lambda: LanguageModel(cfg, seq_len=context, rngs=nnx.Rngs(params=0)))
    return nnx.merge(nnx.graphdef(widened), nnx.state(model))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _next_token_logprobs(graphdef, params, tokens):
    logits = nnx.merge(graphdef, params)(tokens)
    logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    targets = tokens[:, 1:]
    chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logprobs, axis=-1) == targets
    return chosen, greedy


class Scorer:
    """Scores token rows with a model: next_token_logprobs(tokens [B, T]) -> (log p(tokens[:, t+1] |
    tokens[:, :t+1]) [B, T-1] float32, whether that token was the argmax [B, T-1] bool), as numpy arrays.

    Rows longer than the train length are scored with the full layers widened (model_for_context)."""

    def __init__(self, model: LanguageModel, model_cfg: ml_collections.ConfigDict, train_len: int):
        self.model, self.model_cfg, self.train_len = model, model_cfg, train_len
        self._split = {}

    def next_token_logprobs(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        context = max(tokens.shape[1], self.train_len)
        if context not in self._split:
            self._split[context] = nnx.split(model_for_context(self.model, self.model_cfg, self.train_len, context))
        graphdef, params = self._split[context]
        chosen, greedy = _next_token_logprobs(graphdef, params, jnp.asarray(tokens, jnp.int32))
        return np.asarray(chosen), np.asarray(greedy)

    @classmethod
    def of(cls, loaded) -> "Scorer":
        """The scorer of a generate.LoadedModel."""
        return cls(loaded.model, loaded.config.model, loaded.config.seq_len)
