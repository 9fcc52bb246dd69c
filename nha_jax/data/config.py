"""`default_data_config()`: the `config.data` sub-config (every field is documented in docs/DATA.md)."""
from __future__ import annotations

import ml_collections


def source_config(kind: str, path: str = "", *, weight: float = 1.0, text_field: str = "text",
                  text_split: str = "file") -> ml_collections.ConfigDict:
    """One entry of `data.sources`: kind is embedded | text | jsonl | parquet | prepared."""
    return ml_collections.ConfigDict(
        {"kind": kind, "path": path, "weight": weight, "text_field": text_field, "text_split": text_split}
    )


def default_data_config() -> ml_collections.ConfigDict:
    """Byte-level tokens of Python's own documentation (pydoc_data.topics): trains with no download."""
    return ml_collections.ConfigDict(
        {
            # "byte", or a path to a Hugging Face tokenizer.json or a SentencePiece .model.
            "tokenizer": "byte",
            # Special-token names for tokenizer.json files whose BOS/EOS/pad are not the usual names.
            "bos_token": "",
            "eos_token": "",
            "pad_token": "",
            "add_bos": True,
            "add_eos": True,
            # Named sources, mixed by weight (fractions of rows); see source_config.
            "sources": {"pydoc": source_config("embedded")},
            # "concat" (no padding, documents cut at row ends) or "document" (rows start at documents, padded).
            "packing": "concat",
            "shuffle": True,
            # A document is held out iff a hash of its key falls below this
            # (embedded corpus: 8 of 79 topics, ~4.6% of its tokens).
            "eval_fraction": 0.1,
            "read_threads": 2,
            "prefetch_batches": 4,
        }
    )
