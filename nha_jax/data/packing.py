"""Packing plans: which pieces of which documents fill global row g of a source, as a pure function of g.

A row has seq_len + 1 token slots; inputs are slots [0, T) and targets slots [1, T+1), so every slot-pair inside one
document is a training example and the loss is masked where the pair straddles a document boundary or padding.

Modes (data.packing):
- "concat": per epoch, the documents in a seeded order form one token stream; row r is stream[rT, rT + T + 1).
  Rows overlap by one token so every token is an input exactly once and a target at most once per epoch. A document
  cut by a row end continues in the next row as its own segment with positions restarting at 0: attention cannot
  see across rows anyway, and restarting keeps every position < T, the range the model trains on.
- "document": every row starts at a document start; documents are placed whole, next-fit, in a seeded order, and
  padding fills the rest of the row. A document longer than a row is cut into row-sized chunks (each overlapping the
  previous by one token, so no target is lost). The plan is built once per seed and its rows are reshuffled every
  epoch, which keeps the number of rows per epoch fixed and the row lookup O(1).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

PACKING_MODES = ("concat", "document")


@dataclass(frozen=True)
class Piece:
    """Tokens [start, stop) of store document `doc`, written to row slots [slot, slot + stop - start)."""

    doc: int
    start: int
    stop: int
    slot: int


class PackedSource:
    """Rows of one source's documents (store ids `doc_ids` [N], token counts `lengths` [N], all > 0).

    `seed_key` (non-negative ints) seeds every shuffle, so a row is a pure function of (seed_key, row, documents).
    """

    def __init__(self, doc_ids: np.ndarray, lengths: np.ndarray, *, seq_len: int, mode: str, shuffle: bool,
                 seed_key: tuple[int, ...]):
        if mode not in PACKING_MODES:
            raise ValueError(f"data.packing={mode!r}; use one of {PACKING_MODES}")
        if len(doc_ids) == 0:
            raise ValueError("no documents to pack (empty split); lower or raise data.eval_fraction, or add data")
        self._doc_ids = np.asarray(doc_ids, np.int64)
        self._lengths = np.asarray(lengths, np.int64)
        self.seq_len = seq_len
        self._mode = mode
        self._shuffle = shuffle
        self._seed_key = tuple(seed_key)
        if mode == "concat":
            self.total_tokens = int(self._lengths.sum())
            self.rows_per_epoch = -(-self.total_tokens // seq_len)
        else:
            self._plan_pieces, self._plan_row_offsets = self._document_plan()
            self.rows_per_epoch = len(self._plan_row_offsets) - 1
        self._epoch_plan = functools.lru_cache(maxsize=2)(self._build_epoch_plan)

    def _order(self, count: int, *salt: int) -> np.ndarray:
        if not self._shuffle:
            return np.arange(count)
        return np.random.default_rng([*self._seed_key, *salt]).permutation(count)

    def _document_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """Next-fit packing once per seed: (pieces int64 [P, 4] as doc/start/stop/slot, row_offsets int64 [R + 1])."""
        capacity = self.seq_len + 1
        pieces: list[tuple[int, int, int, int]] = []
        row_offsets = [0]
        fill = 0
        for index in self._order(len(self._doc_ids), 0x0D0C):
            doc, length = int(self._doc_ids[index]), int(self._lengths[index])
            # Chunks start every T tokens and hold T + 1, so consecutive chunks share one token (no lost target).
            chunk_starts = range(0, length - 1, self.seq_len) if length > capacity else (0,)
            for start in chunk_starts:
                stop = min(start + capacity, length)
                if fill + stop - start > capacity:
                    row_offsets.append(len(pieces))
                    fill = 0
                pieces.append((doc, start, stop, fill))
                fill += stop - start
        row_offsets.append(len(pieces))
        # numpy arrays, not Python objects: ~32 bytes per piece for corpora of millions of documents
        return np.asarray(pieces, np.int64).reshape(-1, 4), np.asarray(row_offsets, np.int64)

    def _build_epoch_plan(self, epoch: int):
        if self._mode == "document":
            return self._order(self.rows_per_epoch, 0x0D0C, epoch)  # row permutation of the fixed plan
        order = self._order(len(self._doc_ids), epoch)
        return order, np.cumsum(self._lengths[order])

    def pieces(self, row: int) -> tuple[Piece, ...]:
        """The pieces of global row `row` (any epoch: row // rows_per_epoch is the epoch)."""
        epoch, row_in_epoch = divmod(int(row), self.rows_per_epoch)
        if self._mode == "document":
            plan_row = int(self._epoch_plan(epoch)[row_in_epoch])
            first, last = self._plan_row_offsets[plan_row : plan_row + 2]
            return tuple(Piece(*map(int, piece)) for piece in self._plan_pieces[first:last])
        order, ends = self._epoch_plan(epoch)
        position = row_in_epoch * self.seq_len
        row_end = min(position + self.seq_len + 1, self.total_tokens)
        index = int(np.searchsorted(ends, position, side="right"))
        pieces = []
        while position < row_end:
            doc_end = int(ends[index])
            doc_start = doc_end - int(self._lengths[order[index]])
            take = min(row_end, doc_end) - position
            pieces.append(Piece(int(self._doc_ids[order[index]]), position - doc_start, position - doc_start + take,
                                position - row_in_epoch * self.seq_len))
            position += take
            index += 1
        return tuple(pieces)


def assemble_row(pieces, store, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pieces -> one row: inputs, targets, segment_ids, positions (int32 [T]) and loss_mask (float32 [T])."""
    tokens = np.full(seq_len + 1, pad_id, np.int32)
    segments = np.zeros(seq_len + 1, np.int32)
    positions = np.zeros(seq_len + 1, np.int32)
    for number, piece in enumerate(pieces, start=1):
        end = piece.slot + piece.stop - piece.start
        tokens[piece.slot : end] = store.read(piece.doc, piece.start, piece.stop)
        segments[piece.slot : end] = number
        positions[piece.slot : end] = np.arange(end - piece.slot, dtype=np.int32)
    same_document = (segments[:-1] == segments[1:]) & (segments[:-1] > 0)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": segments[:-1],
        "positions": positions[:-1],
        "loss_mask": same_document.astype(np.float32),
    }


def padding_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """An all-padding row (segment 0, loss_mask 0), used to fill the last eval batch."""
    pad = np.full(seq_len, pad_id, np.int32)
    zeros = np.zeros(seq_len, np.int32)
    return {"inputs": pad, "targets": pad.copy(), "segment_ids": zeros, "positions": zeros.copy(),
            "loss_mask": np.zeros(seq_len, np.float32)}
