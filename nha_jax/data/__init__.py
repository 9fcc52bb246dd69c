"""Data layer: sources, tokenizers, packing into rows with segment ids and positions, resumable grain iterators."""
from nha_jax.data.config import default_data_config, source_config
from nha_jax.data.pipeline import build_eval_iterator, build_train_iterator
from nha_jax.data.tokenizer import build_tokenizer

__all__ = ["build_eval_iterator", "build_tokenizer", "build_train_iterator", "default_data_config", "source_config"]
