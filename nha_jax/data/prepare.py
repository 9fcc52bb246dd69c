"""prepare_data: tokenize a corpus once into ArrayRecord shards plus manifest.json, in parallel and resumably.

    python -m nha_jax.data.prepare --input 'corpus/*.jsonl' --tokenizer tokenizer.json --out DIR [--workers N]

Documents are grouped, in input order, into shards of about --shard-mb of text; shard i is written by a worker as
shard-0000i.array_record (one record per document: its tokens, little-endian uint16 or uint32) with an index
shard-0000i.index.npz (token count and split score per document). Both are written under a temporary name and
renamed when complete, the records file last, so a shard whose records file exists is finished: a re-run skips it.
manifest.json (written last) records token counts, the tokenizer hash, BOS/EOS settings and the source files;
training refuses shards whose manifest names another tokenizer.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from nha_jax.data.sources import ConfigView, expand_paths, iter_documents, split_score
from nha_jax.data.store import MANIFEST_FORMAT, MANIFEST_NAME
from nha_jax.data.tokenizer import build_tokenizer, encode_documents

PLAN_NAME = "prepare_plan.json"


def _shard_names(index: int) -> tuple[str, str]:
    return f"shard-{index:05d}.array_record", f"shard-{index:05d}.index.npz"


def _source_config(input_paths: str, input_format: str, text_field: str, text_split: str) -> dict:
    if input_format == "auto":
        if input_paths == "embedded":
            input_format = "embedded"
        else:
            suffix = expand_paths(input_paths, what="--input")[0].suffix
            input_format = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix, "text")
    return {"kind": input_format, "path": "" if input_format == "embedded" else input_paths,
            "text_field": text_field, "text_split": text_split}


def _iter_shard_texts(source: dict, shard_bytes: int):
    """(shard index, [(key, text)]) groups of about shard_bytes of text, in input order."""
    group, size, index = [], 0, 0
    for document in iter_documents(ConfigView(source), name="input"):
        group.append((document.key, document.text))
        size += len(document.text)
        if size >= shard_bytes:
            yield index, group
            group, size, index = [], 0, index + 1
    if group:
        yield index, group


_worker_tokenizer = None


def _init_worker(tokenizer_cfg: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(ConfigView(tokenizer_cfg))


def _write_shard(out_dir: str, index: int, documents, add_bos: bool, add_eos: bool, token_dtype: str) -> dict:
    """Tokenize one shard's documents into records + index under temp names; rename the index, then the records."""
    records_name, index_name = _shard_names(index)
    out = Path(out_dir)
    dtype = np.dtype(token_dtype).newbyteorder("<")
    lengths = np.zeros(len(documents), np.int64)
    scores = np.zeros(len(documents), np.float64)
    records_tmp = out / (records_name + ".tmp")
    # group_size:1 makes every record independently readable: random access to one document is one read.
    writer = ArrayRecordWriter(str(records_tmp), "group_size:1")
    all_tokens = encode_documents(_worker_tokenizer, [text for _, text in documents], add_bos=add_bos, add_eos=add_eos)
    for position, ((key, _), tokens) in enumerate(zip(documents, all_tokens)):
        writer.write(tokens.astype(dtype).tobytes())
        lengths[position] = len(tokens)
        scores[position] = split_score(key)
    writer.close()
    index_tmp = out / (index_name + ".tmp")
    with open(index_tmp, "wb") as index_file:
        np.savez(index_file, lengths=lengths, split_scores=scores)
    os.replace(index_tmp, out / index_name)
    os.replace(records_tmp, out / records_name)
    return _shard_entry(index, lengths, sum(len(text) for _, text in documents))


def _shard_entry(index: int, lengths: np.ndarray, text_chars: int) -> dict:
    records_name, index_name = _shard_names(index)
    return {"file": records_name, "index": index_name, "num_documents": int(len(lengths)),
            "num_tokens": int(lengths.sum()), "text_chars": int(text_chars)}


def _finished_shard(out: Path, index: int, documents) -> dict | None:
    records_name, index_name = _shard_names(index)
    if not ((out / records_name).is_file() and (out / index_name).is_file()):
        return None
    with np.load(out / index_name) as shard_index:
        lengths = shard_index["lengths"]
    if len(lengths) != len(documents):
        raise ValueError(f"{out / index_name}: holds {len(lengths)} documents, the input now gives {len(documents)} "
                         "for this shard; the input changed since the interrupted run, use a fresh --out")
    return _shard_entry(index, lengths, sum(len(text) for _, text in documents))


def prepare_data(input_paths: str, out_dir, *, tokenizer: str = "byte", input_format: str = "auto",
                 text_field: str = "text", text_split: str = "file", add_bos: bool = True, add_eos: bool = True,
                 bos_token: str = "", eos_token: str = "", pad_token: str = "", workers: int | None = None,
                 shard_mb: float = 64.0, progress: bool = True) -> dict:
    """Tokenize `input_paths` (files/globs/dirs, comma-separated, or "embedded") into shards under `out_dir`.

    Returns the manifest dict (also written to out_dir/manifest.json). Re-running on the same arguments skips
    finished shards; running with different arguments on a directory with a plan from another run is refused.
    """
    out = Path(out_dir).expanduser()
    tokenizer_cfg = {"tokenizer": tokenizer, "bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
    token_encoder = build_tokenizer(ConfigView(tokenizer_cfg))
    source = _source_config(input_paths, input_format, text_field, text_split)
    files = [] if source["kind"] == "embedded" else expand_paths(input_paths, what="--input")
    token_dtype = "uint16" if token_encoder.vocab_size <= 2**16 else "uint32"
    plan = {"source": source, "files": [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files],
            "tokenizer": {"spec": tokenizer, "fingerprint": token_encoder.fingerprint,
                          "vocab_size": token_encoder.vocab_size},
            "add_bos": add_bos, "add_eos": add_eos, "token_dtype": token_dtype, "shard_mb": shard_mb}
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / PLAN_NAME
    if plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
        raise ValueError(f"--out {out} holds a preparation with other inputs or settings ({plan_path}); "
                         "use a new --out directory or delete this one")
    plan_path.write_text(json.dumps(plan, indent=1))

    workers = max(1, workers or os.cpu_count() or 1)
    shards: dict[int, dict] = {}
    total_bytes = sum(f["bytes"] for f in plan["files"]) or None
    bar = tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare_data", disable=not progress)
    write_args = (add_bos, add_eos, token_dtype)

    def record(index: int, entry: dict) -> None:
        shards[index] = entry
        bar.update(entry["text_chars"])
        bar.set_postfix(tokens=sum(s["num_tokens"] for s in shards.values()))

    shard_texts = _iter_shard_texts(source, int(shard_mb * 2**20))
    if workers == 1:
        _init_worker(tokenizer_cfg)
        for index, documents in shard_texts:
            record(index, _finished_shard(out, index, documents)
                   or _write_shard(str(out), index, documents, *write_args))
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                    initargs=(tokenizer_cfg,)) as pool:
            pending: dict[concurrent.futures.Future, int] = {}
            for index, documents in shard_texts:
                finished = _finished_shard(out, index, documents)
                if finished:
                    record(index, finished)
                    continue
                # Bounded in flight: never hold more than 2 shards of text per worker in memory.
                while len(pending) >= 2 * workers:
                    done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        record(pending.pop(future), future.result())
                pending[pool.submit(_write_shard, str(out), index, documents, *write_args)] = index
            for future in concurrent.futures.as_completed(pending):
                record(pending[future], future.result())
    bar.close()
    if not shards:
        raise ValueError(f"--input {input_paths!r}: the corpus is empty (no non-blank documents)")
    ordered = [shards[i] for i in range(len(shards))]
    manifest = {"format": MANIFEST_FORMAT, **plan,
                "num_documents": sum(s["num_documents"] for s in ordered),
                "num_tokens": sum(s["num_tokens"] for s in ordered), "shards": ordered}
    manifest_tmp = out / (MANIFEST_NAME + ".tmp")
    manifest_tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(manifest_tmp, out / MANIFEST_NAME)
    return manifest


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="files, globs or dirs, comma-separated; or 'embedded'")
    parser.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    parser.add_argument("--tokenizer", default="byte", help="'byte', a tokenizer.json, or a SentencePiece .model")
    parser.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet", "embedded"])
    parser.add_argument("--text-field", default="text", help="jsonl key / parquet column holding the text")
    parser.add_argument("--text-split", default="file", choices=["file", "blank_lines"],
                        help="text files: one document per file, or one per blank-line-separated block")
    parser.add_argument("--no-bos", action="store_true", help="do not start documents with BOS")
    parser.add_argument("--no-eos", action="store_true", help="do not end documents with EOS")
    parser.add_argument("--bos-token", default="")
    parser.add_argument("--eos-token", default="")
    parser.add_argument("--pad-token", default="")
    parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    parser.add_argument("--shard-mb", type=float, default=64.0, help="text per shard, MB")
    args = parser.parse_args(argv)
    try:
        manifest = prepare_data(args.input, args.out, tokenizer=args.tokenizer, input_format=args.format,
                                text_field=args.text_field, text_split=args.text_split, add_bos=not args.no_bos,
                                add_eos=not args.no_eos, bos_token=args.bos_token, eos_token=args.eos_token,
                                pad_token=args.pad_token, workers=args.workers, shard_mb=args.shard_mb)
    except (ValueError, FileNotFoundError) as error:
        print(f"prepare_data: error: {error}", file=sys.stderr)
        return 2
    print(f"prepare_data: {manifest['num_documents']} documents, {manifest['num_tokens']} tokens, "
          f"{len(manifest['shards'])} shards in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
