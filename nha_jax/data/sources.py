"""Raw document sources (embedded, text files, jsonl, parquet) and the held-out split rule.

A source config (one entry of `data.sources`) has `kind`, `path`, `text_field` and `text_split`; `iter_documents`
turns it into a deterministic stream of `Document`s. Prepared ArrayRecord shards are read by `store.py` instead.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

RAW_KINDS = ("embedded", "text", "jsonl", "parquet")
TEXT_SPLITS = ("file", "blank_lines")
_BLANK_LINES = re.compile(r"\n[ \t\r]*\n")


class ConfigView(dict):
    """A plain dict read like a ConfigDict (`cfg.kind`, `cfg.get(...)`): configs rebuilt from JSON or CLI flags."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class Document:
    """One document: `key` decides its split (held-out or train), `text` is what gets tokenized."""

    key: str
    text: str


def split_score(key: str) -> float:
    """The stable split rule: a document is held out iff this hash of its key, in [0, 1), is < data.eval_fraction."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def expand_paths(pattern_list: str, *, what: str) -> list[Path]:
    """Comma-separated files, globs (** allowed) or directories -> sorted existing files; error if none match."""
    files: list[Path] = []
    for pattern in [p.strip() for p in str(pattern_list).split(",") if p.strip()]:
        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            matches = [str(p) for p in Path(expanded).rglob("*") if p.is_file()]
        else:
            matches = [m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"{what}: {pattern!r} matches no files; check the path (globs and dirs allowed)")
        files.extend(Path(m) for m in sorted(matches))
    if not files:
        raise FileNotFoundError(f"{what}: no path given; set it to files, globs or directories")
    return files


def _embedded_documents() -> Iterator[Document]:
    # Python's own documentation topics: ~0.5-0.8 MB of English that ships with every interpreter.
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield Document(key=f"pydoc:{key}", text=topics[key])


def _text_documents(files: list[Path], text_split: str) -> Iterator[Document]:
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for document in [text] if text_split == "file" else _BLANK_LINES.split(text):
            yield Document(key=document, text=document)


def _jsonl_documents(files: list[Path], text_field: str) -> Iterator[Document]:
    for path in files:
        with open(path, encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(
                        f"{path}:{line_number}: no string field {text_field!r}; set the source's text_field to the "
                        "key that holds the document text"
                    )
                yield Document(key=text, text=text)


def _parquet_documents(files: list[Path], text_field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise ImportError("parquet sources need `pyarrow`: pip install 'nha-jax[data]'") from error
    for path in files:
        parquet_file = parquet.ParquetFile(path)
        if text_field not in parquet_file.schema_arrow.names:
            raise ValueError(
                f"{path}: no column {text_field!r} (columns: {parquet_file.schema_arrow.names}); set the source's "
                "text_field to the column that holds the document text"
            )
        for batch in parquet_file.iter_batches(columns=[text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield Document(key=text, text=text)


def iter_documents(source_cfg, *, name: str = "source") -> Iterator[Document]:
    """Documents of one raw source, in a deterministic order; whitespace-only documents are skipped."""
    kind = source_cfg.kind
    what = f"data.sources.{name}.path"
    if kind == "embedded":
        documents = _embedded_documents()
    elif kind == "text":
        text_split = source_cfg.get("text_split", "file")
        if text_split not in TEXT_SPLITS:
            raise ValueError(f"data.sources.{name}.text_split={text_split!r}; use one of {TEXT_SPLITS}")
        documents = _text_documents(expand_paths(source_cfg.path, what=what), text_split)
    elif kind == "jsonl":
        documents = _jsonl_documents(expand_paths(source_cfg.path, what=what), source_cfg.get("text_field", "text"))
    elif kind == "parquet":
        documents = _parquet_documents(expand_paths(source_cfg.path, what=what), source_cfg.get("text_field", "text"))
    else:
        raise ValueError(
            f"data.sources.{name}.kind={kind!r}; use one of {RAW_KINDS + ('prepared',)}"
        )
    return (document for document in documents if document.text.strip())
