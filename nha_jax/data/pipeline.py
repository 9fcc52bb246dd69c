"""The train and eval iterators: sources -> packed rows -> weighted mixture -> this process's slice of each batch.

Global row g is a pure function of (seed, g, data fingerprint): the mixture picks (source, source row), the packing
plan of that source picks the document pieces. Global batch k is rows [k*B, (k+1)*B) and process p reads only rows
[k*B + p*b, k*B + (p+1)*b) with b = B / process_count, so resuming at any step, on any number of hosts, needs no
replay; the iterator state is just the next global row. Batches are computed on grain's thread pool, ahead of use.
"""
from __future__ import annotations

import functools
import hashlib
import json

import numpy as np

from nha_jax.data.packing import PackedSource, assemble_row, padding_row
from nha_jax.data.store import open_store
from nha_jax.data.tokenizer import build_tokenizer

STATE_FORMAT = "nha-jax-data-v1"
_ENDLESS = 2**62


class RowMixture:
    """Maps global row g to (source, row of that source) with the configured weights, exactly per block of rows.

    Each block of `block_rows` rows gives source i a fixed quota (weights rounded by largest remainder) in a seeded
    order, so source i's row index is block * quota_i + rank within the block: O(1) per row, no prefix sums.
    """

    block_rows = 1024

    def __init__(self, weights, seed: int):
        weights = np.asarray(weights, np.float64)
        if weights.size == 0 or np.any(~np.isfinite(weights)) or np.any(weights <= 0):
            raise ValueError(f"data.sources weights must be positive and finite, got {weights.tolist()}")
        exact = weights / weights.sum() * self.block_rows
        quotas = np.floor(exact).astype(np.int64)
        remainder_order = np.argsort(-(exact - quotas), kind="stable")
        quotas[remainder_order[: self.block_rows - quotas.sum()]] += 1
        if np.any(quotas == 0):
            raise ValueError(
                f"data.sources weights {weights.tolist()}: a weight below 1/{self.block_rows} of the total would get "
                "no rows; raise it or drop that source"
            )
        self.quotas = quotas
        self._seed = seed
        self._block = functools.lru_cache(maxsize=4)(self._build_block)

    def _build_block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        assignment = np.repeat(np.arange(len(self.quotas)), self.quotas)
        if len(self.quotas) > 1:
            assignment = assignment[np.random.default_rng([self._seed, 0x6D1, block]).permutation(self.block_rows)]
        rank = np.zeros(self.block_rows, np.int64)
        for source in range(len(self.quotas)):
            members = np.flatnonzero(assignment == source)
            rank[members] = np.arange(len(members))
        return assignment, rank

    def locate(self, row: int) -> tuple[int, int]:
        """Global row -> (source index, row index within that source's packed stream)."""
        block, offset = divmod(int(row), self.block_rows)
        assignment, rank = self._block(block)
        source = int(assignment[offset])
        return source, block * int(self.quotas[source]) + int(rank[offset])


def _validate_batch_args(seq_len, global_batch_size, process_index, process_count):
    if not (isinstance(seq_len, (int, np.integer)) and seq_len > 0):
        raise ValueError(f"seq_len={seq_len!r} must be a positive int")
    if not (isinstance(process_count, (int, np.integer)) and process_count > 0):
        raise ValueError(f"process_count={process_count!r} must be a positive int")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r} must be in [0, process_count={process_count})")
    if not (isinstance(global_batch_size, (int, np.integer)) and global_batch_size > 0
            and global_batch_size % process_count == 0):
        raise ValueError(
            f"global_batch_size={global_batch_size!r} must be a positive multiple of process_count={process_count}"
        )


def _open_splits(data_cfg, *, held_out: bool):
    """[(name, weight, store, doc_ids)] for every source, doc_ids being the documents of the requested split."""
    if len(data_cfg.sources) == 0:
        raise ValueError("data.sources is empty; add at least one source (see docs/DATA.md)")
    eval_fraction = float(data_cfg.eval_fraction)
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction={eval_fraction} must be in [0, 1)")
    opened = []
    for name in sorted(data_cfg.sources.keys()):
        source_cfg = data_cfg.sources[name]
        store = open_store(source_cfg, data_cfg, name=name)
        in_split = (store.split_scores < eval_fraction) == held_out
        doc_ids = np.flatnonzero(in_split & (store.lengths > 0))
        opened.append((name, float(source_cfg.get("weight", 1.0)), store, doc_ids))
    return opened


def _fingerprint(data_cfg, opened, tokenizer) -> str:
    identity = {
        "tokenizer": tokenizer.fingerprint,
        "add_bos": bool(data_cfg.add_bos),
        "add_eos": bool(data_cfg.add_eos),
        "packing": str(data_cfg.packing),
        "shuffle": bool(data_cfg.shuffle),
        "eval_fraction": float(data_cfg.eval_fraction),
        "sources": [(name, weight, store.fingerprint) for name, weight, store, _ in opened],
    }
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=16).hexdigest()


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


class TrainIterator:
    """Infinite iterator over this process's rows of each global batch; `get_state`/`set_state` give exact resume.

    Each `next()` is a dict of inputs, targets, segment_ids, positions (int32 [b, T]) and loss_mask (float32 [b, T]),
    b = global_batch_size // process_count.
    """

    def __init__(self, read_row, *, seq_len, global_batch_size, process_index, process_count, seed, fingerprint,
                 read_threads, prefetch_batches):
        self._read_row = read_row
        self._seq_len = seq_len
        self._global_batch_size = global_batch_size
        self._local_batch_size = global_batch_size // process_count
        self._process_index = process_index
        self._seed = seed
        self._fingerprint = fingerprint
        self._read_options = dict(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
        self._next_row = 0
        self._batches = None

    def _local_batch(self, first_global_row: int) -> dict[str, np.ndarray]:
        first = first_global_row + self._process_index * self._local_batch_size
        return _stack([self._read_row(row) for row in range(first, first + self._local_batch_size)])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            import grain  # imported here, not at the top: grain pulls in jax, which prepare_data's workers never need

            start, batch = self._next_row, self._global_batch_size
            steps = grain.MapDataset.range(0, _ENDLESS).map(lambda step: self._local_batch(start + step * batch))
            self._batches = iter(steps.to_iter_dataset(grain.ReadOptions(**self._read_options)))
        local_batch = next(self._batches)
        self._next_row += self._global_batch_size
        return local_batch

    def get_state(self) -> dict:
        """JSON-serialisable position: the next global row, plus what must match for a resume to be exact."""
        return {"format": STATE_FORMAT, "next_row": self._next_row, "seed": self._seed, "seq_len": self._seq_len,
                "data_fingerprint": self._fingerprint}

    def set_state(self, state: dict) -> None:
        """Continue from a `get_state()` dict; the number of processes (and the batch size) may differ."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data iterator state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        for key, mine in (("seed", self._seed), ("seq_len", self._seq_len), ("data_fingerprint", self._fingerprint)):
            if state[key] != mine:
                raise ValueError(
                    f"cannot resume the data iterator: the checkpoint has {key}={state[key]!r} but this run has "
                    f"{mine!r}; the data, tokenizer, packing or seed changed since the checkpoint was written"
                )
        self._next_row = int(state["next_row"])
        self._batches = None


def build_train_iterator(data_cfg, *, seq_len: int, global_batch_size: int, seed: int, process_index: int = 0,
                         process_count: int = 1) -> TrainIterator:
    """Infinite, resumable iterator over this process's [global_batch_size // process_count, seq_len] training rows."""
    _validate_batch_args(seq_len, global_batch_size, process_index, process_count)
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ValueError(f"seed={seed!r} must be a non-negative int (it seeds numpy's SeedSequence)")
    tokenizer = build_tokenizer(data_cfg)
    opened = _open_splits(data_cfg, held_out=False)
    packed = []
    for index, (name, _, store, doc_ids) in enumerate(opened):
        if len(doc_ids) == 0:
            raise ValueError(f"data.sources.{name}: no training documents left after the held-out split "
                             f"(data.eval_fraction={data_cfg.eval_fraction}); lower eval_fraction or add data")
        packed.append(PackedSource(doc_ids, store.lengths[doc_ids], seq_len=seq_len, mode=str(data_cfg.packing),
                                   shuffle=bool(data_cfg.shuffle), seed_key=(int(seed), index)))
    mixture = RowMixture([weight for _, weight, _, _ in opened], int(seed))

    def read_row(row: int) -> dict[str, np.ndarray]:
        source, source_row = mixture.locate(row)
        return assemble_row(packed[source].pieces(source_row), opened[source][2], seq_len, tokenizer.pad_id)

    return TrainIterator(read_row, seq_len=seq_len, global_batch_size=global_batch_size, process_index=process_index,
                         process_count=process_count, seed=int(seed),
                         fingerprint=_fingerprint(data_cfg, opened, tokenizer),
                         read_threads=int(data_cfg.read_threads), prefetch_batches=int(data_cfg.prefetch_batches))


def build_eval_iterator(data_cfg, *, seq_len: int, global_batch_size: int, process_index: int = 0,
                        process_count: int = 1):
    """Finite, deterministic iterator over the held-out split of every source (in name order, unshuffled, packed
    "concat"), same dict as training; the last batch is filled with all-padding rows (loss_mask 0)."""
    _validate_batch_args(seq_len, global_batch_size, process_index, process_count)
    tokenizer = build_tokenizer(data_cfg)
    rows = []
    for _, _, store, doc_ids in _open_splits(data_cfg, held_out=True):
        if len(doc_ids) == 0:
            continue
        source = PackedSource(doc_ids, store.lengths[doc_ids], seq_len=seq_len, mode="concat", shuffle=False,
                              seed_key=(0,))
        rows.extend((source, store, row) for row in range(source.rows_per_epoch))
    if not rows:
        raise ValueError(f"the held-out split is empty (data.eval_fraction={data_cfg.eval_fraction}); raise it")
    local_batch_size = global_batch_size // process_count
    num_batches = -(-len(rows) // global_batch_size)

    def read_row(row: int) -> dict[str, np.ndarray]:
        if row >= len(rows):
            return padding_row(seq_len, tokenizer.pad_id)
        source, store, source_row = rows[row]
        return assemble_row(source.pieces(source_row), store, seq_len, tokenizer.pad_id)

    def local_batch(step: int) -> dict[str, np.ndarray]:
        first = step * global_batch_size + process_index * local_batch_size
        return _stack([read_row(row) for row in range(first, first + local_batch_size)])

    import grain  # see TrainIterator.__next__

    read_options = grain.ReadOptions(num_threads=int(data_cfg.read_threads),
                                     prefetch_buffer_size=int(data_cfg.prefetch_batches))
    return iter(grain.MapDataset.range(0, num_batches).map(local_batch).to_iter_dataset(read_options))
