"""Tokenized documents with random access: in memory (raw sources) or ArrayRecord shards (from prepare_data).

A store knows, per document, its token count (`lengths`) and a split score in [0, 1) (`split_scores`, the hash
fraction of `sources.split_score`), so the held-out set can be chosen at load time from `data.eval_fraction`.
`read(doc, start, stop)` returns the int32 tokens [stop - start] of one document.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource

from nha_jax.data.sources import ConfigView, expand_paths, iter_documents, split_score
from nha_jax.data.tokenizer import build_tokenizer, encode_documents

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "nha-jax-prepared-v1"


class InMemoryStore:
    """All documents of a raw source tokenized into one flat int32 array (fine up to a few hundred MB of text)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, split_scores: np.ndarray, tokenizer_fingerprint: str):
        self._tokens = tokens
        self._offsets = offsets
        self.lengths = np.diff(offsets)
        self.split_scores = split_scores
        content = hashlib.blake2b(digest_size=16)
        for part in (tokenizer_fingerprint.encode(), tokens.tobytes(), offsets.tobytes()):
            content.update(part)
        self.fingerprint = content.hexdigest()

    @classmethod
    def from_source(cls, source_cfg, tokenizer, *, add_bos: bool, add_eos: bool, name: str) -> "InMemoryStore":
        """Tokenize every document of a raw source (embedded, text, jsonl, parquet)."""
        documents = list(iter_documents(source_cfg, name=name))
        pieces = encode_documents(tokenizer, [d.text for d in documents], add_bos=add_bos, add_eos=add_eos)
        scores = [split_score(d.key) for d in documents]
        if not pieces:
            raise ValueError(f"data.sources.{name}: the corpus is empty (no non-blank documents in "
                             f"{source_cfg.path!r})")
        offsets = np.zeros(len(pieces) + 1, np.int64)
        np.cumsum([len(p) for p in pieces], out=offsets[1:])
        return cls(np.concatenate(pieces), offsets, np.asarray(scores, np.float64), tokenizer.fingerprint)

    def read(self, doc: int, start: int, stop: int) -> np.ndarray:
        """int32 [stop - start] tokens of document `doc`."""
        base = self._offsets[doc]
        return self._tokens[base + start : base + stop]


class ArrayRecordStore:
    """Documents from prepare_data's ArrayRecord shards: one record per document, tokens as little-endian ints."""

    def __init__(self, directory: Path, tokenizer, *, add_bos: bool, add_eos: bool, name: str):
        manifest_path = directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"data.sources.{name}.path={str(directory)!r} has no {MANIFEST_NAME}; run "
                "`python -m nha_jax.data.prepare --out DIR ...` first (or finish an interrupted run)"
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        check_manifest_tokenizer(manifest, tokenizer, add_bos=add_bos, add_eos=add_eos, where=str(manifest_path))
        if manifest["num_documents"] == 0:
            raise ValueError(f"{manifest_path}: the corpus is empty (0 documents)")
        lengths, scores = [], []
        for shard in manifest["shards"]:
            with np.load(directory / shard["index"]) as index:
                lengths.append(index["lengths"].astype(np.int64))
                scores.append(index["split_scores"])
        self.lengths = np.concatenate(lengths)
        self.split_scores = np.concatenate(scores)
        self._dtype = np.dtype(manifest["token_dtype"]).newbyteorder("<")
        self._records = ArrayRecordDataSource([str(directory / s["file"]) for s in manifest["shards"]])
        # What the rows are made of, not where the files live: shards moved to another mount resume fine.
        content = hashlib.blake2b(digest_size=16)
        for part in (tokenizer.fingerprint, manifest["token_dtype"], self.lengths, self.split_scores):
            content.update(part.tobytes() if isinstance(part, np.ndarray) else part.encode())
        self.fingerprint = content.hexdigest()
        # A long document is read once per row it spans; a small cache keeps that to one disk read.
        self._decoded = functools.lru_cache(maxsize=64)(self._decode)

    def _decode(self, doc: int) -> np.ndarray:
        return np.frombuffer(self._records[doc], dtype=self._dtype).astype(np.int32)

    def read(self, doc: int, start: int, stop: int) -> np.ndarray:
        """int32 [stop - start] tokens of document `doc`."""
        return self._decoded(int(doc))[start:stop]


def check_manifest_tokenizer(manifest: dict, tokenizer, *, add_bos: bool, add_eos: bool, where: str) -> None:
    """Refuse shards made with another tokenizer or other BOS/EOS settings (their token ids would be garbage)."""
    if manifest["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
        raise ValueError(
            f"{where}: tokenizer mismatch: the shards were made with tokenizer {manifest['tokenizer']['spec']!r} "
            f"(hash {manifest['tokenizer']['fingerprint'][:12]}), but data.tokenizer has hash "
            f"{tokenizer.fingerprint[:12]}; use the same tokenizer file or re-run prepare_data"
        )
    if (manifest["add_bos"], manifest["add_eos"]) != (add_bos, add_eos):
        raise ValueError(
            f"{where}: the shards have add_bos={manifest['add_bos']}, add_eos={manifest['add_eos']} but the config "
            f"says add_bos={add_bos}, add_eos={add_eos}; match data.add_bos/data.add_eos or re-run prepare_data"
        )


@functools.lru_cache(maxsize=8)
def _cached_store(source_json: str, file_stamps: tuple, tokenizer_key: tuple, add_bos: bool, add_eos: bool, name: str):
    del file_stamps  # part of the cache key only: an edited file must be re-read
    source_cfg = ConfigView(json.loads(source_json))
    tokenizer = build_tokenizer(ConfigView(tokenizer_key))
    if source_cfg.kind == "prepared":
        return ArrayRecordStore(Path(source_cfg.path).expanduser(), tokenizer, add_bos=add_bos, add_eos=add_eos,
                                name=name)
    return InMemoryStore.from_source(source_cfg, tokenizer, add_bos=add_bos, add_eos=add_eos, name=name)


def open_store(source_cfg, data_cfg, *, name: str):
    """The store of one `data.sources` entry; raw sources are tokenized once per process and cached."""
    source = {key: source_cfg[key] for key in source_cfg.keys()}
    if source["kind"] in ("text", "jsonl", "parquet"):
        files = expand_paths(source["path"], what=f"data.sources.{name}.path")
        stamps = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    elif source["kind"] == "prepared":
        manifest = Path(source["path"]).expanduser() / MANIFEST_NAME
        stamps = (str(manifest), manifest.stat().st_mtime_ns) if manifest.is_file() else ()
    else:
        stamps = ()
    tokenizer_key = tuple(
        (key, str(data_cfg.get(key, ""))) for key in ("tokenizer", "bos_token", "eos_token", "pad_token")
    )
    return _cached_store(
        json.dumps(source, sort_keys=True), stamps, tokenizer_key, bool(data_cfg.add_bos), bool(data_cfg.add_eos), name
    )
