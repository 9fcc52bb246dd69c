"""Data pipeline: the batch contract, packing coverage, exact resume, multi-host slicing, mixtures, errors."""
import json

import numpy as np
import pytest

from nha_jax.data import (build_eval_iterator, build_tokenizer, build_train_iterator, default_data_config,
                          source_config)
from nha_jax.data.packing import PackedSource, assemble_row
from nha_jax.data.pipeline import RowMixture
from nha_jax.data.store import open_store

WORDS = "the of and to in is was for on that with as by at from his her it an were are which this be".split()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Two jsonl corpora of documents with very different lengths (1 word to ~5 rows), plus one of digits only."""
    directory = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    with open(directory / "words.jsonl", "w") as out:
        for doc in range(60):
            length = int(rng.choice([1, 3, 20, 60, 150]))
            out.write(json.dumps({"id": doc, "text": " ".join(rng.choice(WORDS, length))}) + "\n")
    with open(directory / "digits.jsonl", "w") as out:
        for doc in range(40):
            out.write(json.dumps({"text": " ".join(str(d) for d in rng.integers(0, 10, 30))}) + "\n")
    return directory


def words_config(corpus_dir, **overrides):
    cfg = default_data_config()
    cfg.sources = {"words": source_config("jsonl", str(corpus_dir / "words.jsonl"))}
    cfg.eval_fraction = 0.1
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def check_row_contract(batch, vocab_size):
    """The documented meaning of every field, checked row by row."""
    inputs, targets, segments = batch["inputs"], batch["targets"], batch["segment_ids"]
    positions, loss_mask = batch["positions"], batch["loss_mask"]
    for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                       ("positions", np.int32), ("loss_mask", np.float32)]:
        assert batch[key].dtype == dtype and batch[key].shape == inputs.shape, key
    assert inputs.min() >= 0 and inputs.max() < vocab_size
    for row in range(inputs.shape[0]):
        seg, pos = segments[row], positions[row]
        starts = np.flatnonzero(np.diff(seg, prepend=-1) != 0)
        real_starts = starts[seg[starts] > 0]
        # documents are numbered 1, 2, ... within the row, and positions restart at 0 in each one
        assert np.array_equal(seg[real_starts], np.arange(1, len(real_starts) + 1))
        assert np.all(pos[real_starts] == 0)
        inside = (seg > 0) & (np.diff(seg, prepend=-1) == 0)
        assert np.all(pos[1:][inside[1:]] == pos[:-1][inside[1:]] + 1)
        # within a document the target is the next input; the loss never crosses a boundary nor touches padding
        same_next = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
        assert np.array_equal(targets[row][:-1][same_next], inputs[row][1:][same_next])
        assert np.all(loss_mask[row][:-1][~same_next] == 0)
        assert np.all(loss_mask[row][seg == 0] == 0)


def test_default_config_batches_follow_the_contract():
    cfg = default_data_config()
    tokenizer = build_tokenizer(cfg)
    assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (259, 0, 1, 2)
    assert tokenizer.decode(tokenizer.encode("héllo\n")) == "héllo\n"
    iterator = build_train_iterator(cfg, seq_len=64, global_batch_size=4, seed=0)
    for batch in take(iterator, 3):
        check_row_contract(batch, tokenizer.vocab_size)
        assert batch["inputs"].shape == (4, 64)
        assert batch["loss_mask"].mean() > 0.9  # concat packing: almost no masked positions
    json.dumps(iterator.get_state())
    eval_batches = list(build_eval_iterator(cfg, seq_len=64, global_batch_size=4))
    assert eval_batches and all(b["inputs"].shape == (4, 64) for b in eval_batches)


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_every_target_appears_once_per_epoch_and_rows_never_mix_documents(corpus_dir, packing):
    cfg = words_config(corpus_dir, packing=packing)
    store = open_store(cfg.sources.words, cfg, name="words")
    doc_ids = np.flatnonzero(store.split_scores >= cfg.eval_fraction)
    seq_len = 32
    packed = PackedSource(doc_ids, store.lengths[doc_ids], seq_len=seq_len, mode=packing, shuffle=True,
                          seed_key=(3, 0))
    assert max(store.lengths[doc_ids]) > 3 * seq_len  # some documents must be split across rows
    for epoch in range(2):
        input_count = {int(d): np.zeros(store.lengths[d], int) for d in doc_ids}
        target_count = {int(d): np.zeros(store.lengths[d], int) for d in doc_ids}
        for row in range(epoch * packed.rows_per_epoch, (epoch + 1) * packed.rows_per_epoch):
            pieces = packed.pieces(row)
            batch = assemble_row(pieces, store, seq_len, pad_id=0)
            for number, piece in enumerate(pieces, start=1):
                slots = np.arange(piece.slot, piece.slot + piece.stop - piece.start)
                inputs = slots[slots < seq_len]
                # the row holds exactly this piece's tokens under one segment id, positions from 0
                np.testing.assert_array_equal(batch["inputs"][inputs],
                                              store.read(piece.doc, piece.start, piece.start + len(inputs)))
                assert np.all(batch["segment_ids"][inputs] == number)
                np.testing.assert_array_equal(batch["positions"][inputs], np.arange(len(inputs)))
                input_count[piece.doc][piece.start : piece.start + len(inputs)] += 1
                target_count[piece.doc][piece.start + 1 : piece.stop] += 1
                assert np.all(batch["loss_mask"][slots[:-1]] == 1)
            check_row_contract({k: v[None] for k, v in batch.items()}, 259)
        for doc in doc_ids:
            assert np.all(target_count[int(doc)][1:] == 1), f"doc {doc}: every next-token target exactly once"
            if packing == "concat":
                assert np.all(input_count[int(doc)] == 1), f"doc {doc}: every token an input exactly once"
        if packing == "document":
            # rows start at a document (or chunk) start and pad only at the end
            assert all(packed.pieces(r)[0].slot == 0 for r in range(packed.rows_per_epoch))


def test_epochs_and_seeds_reshuffle(corpus_dir):
    cfg = words_config(corpus_dir)
    store = open_store(cfg.sources.words, cfg, name="words")
    doc_ids = np.flatnonzero(store.split_scores >= cfg.eval_fraction)

    def packed(seed):
        return PackedSource(doc_ids, store.lengths[doc_ids], seq_len=32, mode="concat", shuffle=True,
                            seed_key=(seed, 0))

    first = packed(0)
    rows = first.rows_per_epoch
    assert first.pieces(0) != first.pieces(rows)  # epoch 1 is a different order
    assert first.pieces(5) == packed(0).pieces(5)  # the same seed is the same plan
    assert [first.pieces(r) for r in range(4)] != [packed(1).pieces(r) for r in range(4)]


def test_resume_at_step_k_equals_uninterrupted_on_any_host_count(corpus_dir):
    cfg = words_config(corpus_dir)
    arguments = dict(seq_len=128, global_batch_size=8, seed=7)
    store = open_store(cfg.sources.words, cfg, name="words")
    rows_per_epoch = -(-int(store.lengths[store.split_scores >= cfg.eval_fraction].sum()) // 128)
    assert 40 < rows_per_epoch < 96  # the resumed part crosses into the second epoch
    uninterrupted = take(build_train_iterator(cfg, **arguments), 12)
    first = build_train_iterator(cfg, **arguments)
    take(first, 5)
    state = json.loads(json.dumps(first.get_state()))
    assert state["next_row"] == 40
    for process_count in (1, 2, 4):
        resumed = []
        for process_index in range(process_count):
            iterator = build_train_iterator(cfg, **arguments, process_index=process_index,
                                            process_count=process_count)
            iterator.set_state(state)
            resumed.append(take(iterator, 7))
        glued = [{key: np.concatenate([resumed[p][step][key] for p in range(process_count)])
                  for key in uninterrupted[0]} for step in range(7)]
        assert_batches_equal(glued, uninterrupted[5:])
    # the state after resuming and reading on continues to count global rows
    assert iterator.get_state()["next_row"] == 40 + 7 * 8


def test_hosts_read_only_their_slice(corpus_dir):
    cfg = words_config(corpus_dir)
    whole = take(build_train_iterator(cfg, seq_len=16, global_batch_size=8, seed=1), 3)
    for process_count in (2, 4):
        for process_index in range(process_count):
            part = take(build_train_iterator(cfg, seq_len=16, global_batch_size=8, seed=1,
                                             process_index=process_index, process_count=process_count), 3)
            rows = slice(process_index * 8 // process_count, (process_index + 1) * 8 // process_count)
            assert_batches_equal(part, [{k: v[rows] for k, v in batch.items()} for batch in whole])


def test_mixture_weights_hold_and_each_source_is_read_in_order(corpus_dir):
    mixture = RowMixture([1.0, 3.0, 0.5], seed=4)
    located = [mixture.locate(row) for row in range(5 * RowMixture.block_rows + 300)]
    sources = np.array([s for s, _ in located])
    for source, weight in enumerate([1 / 4.5, 3 / 4.5, 0.5 / 4.5]):
        assert abs(np.mean(sources == source) - weight) < 0.01
        source_rows = sorted(r for s, r in located if s == source)
        assert source_rows == list(range(len(source_rows)))  # no source row skipped or repeated
    assert located != [RowMixture([1.0, 3.0, 0.5], seed=5).locate(r) for r in range(len(located))]

    cfg = words_config(corpus_dir, eval_fraction=0.0)
    cfg.sources = {"words": source_config("jsonl", str(corpus_dir / "words.jsonl"), weight=1.0),
                   "digits": source_config("jsonl", str(corpus_dir / "digits.jsonl"), weight=3.0)}
    tokenizer = build_tokenizer(cfg)
    digit_ids = set(tokenizer.encode("0123456789 ")) | {tokenizer.bos_id, tokenizer.eos_id}
    batches = take(build_train_iterator(cfg, seq_len=16, global_batch_size=64, seed=0), 10)
    rows = np.concatenate([b["inputs"] for b in batches])
    digit_rows = np.mean([set(row.tolist()) <= digit_ids for row in rows])
    assert abs(digit_rows - 0.75) < 0.05


def test_eval_split_is_held_out_deterministic_and_complete(corpus_dir):
    cfg = words_config(corpus_dir, eval_fraction=0.2)
    store = open_store(cfg.sources.words, cfg, name="words")
    held_out = np.flatnonzero(store.split_scores < 0.2)
    assert 0 < len(held_out) < len(store.lengths)
    first = list(build_eval_iterator(cfg, seq_len=16, global_batch_size=4))
    assert_batches_equal(first, list(build_eval_iterator(cfg, seq_len=16, global_batch_size=4)))
    inputs = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in first])
    expected = np.concatenate([store.read(d, 0, store.lengths[d]) for d in held_out])
    np.testing.assert_array_equal(inputs, expected)  # unshuffled: every held-out token once, in order
    halves = [list(build_eval_iterator(cfg, seq_len=16, global_batch_size=4, process_index=p, process_count=2))
              for p in range(2)]
    glued = [{k: np.concatenate([halves[0][i][k], halves[1][i][k]]) for k in first[0]} for i in range(len(first))]
    assert_batches_equal(glued, first)
    # the training rows never contain a held-out document: compare token multisets over one epoch
    train = build_train_iterator(cfg, seq_len=16, global_batch_size=1, seed=0)
    train_docs = np.flatnonzero(store.split_scores >= 0.2)
    total = int(store.lengths[train_docs].sum())
    seen = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in take(train, -(-total // 16))])
    expected_train = np.concatenate([store.read(d, 0, store.lengths[d]) for d in train_docs])
    np.testing.assert_array_equal(np.bincount(seen, minlength=259), np.bincount(expected_train, minlength=259))


def test_clear_errors(corpus_dir, tmp_path):
    cfg = words_config(corpus_dir)
    missing = default_data_config()
    missing.sources = {"gone": source_config("text", str(tmp_path / "nope*.txt"))}
    with pytest.raises(FileNotFoundError, match="nope"):
        build_train_iterator(missing, seq_len=16, global_batch_size=2, seed=0)

    (tmp_path / "blank.txt").write_text("\n\n   \n")
    empty = default_data_config()
    empty.sources = {"blank": source_config("text", str(tmp_path / "blank.txt"))}
    with pytest.raises(ValueError, match="empty"):
        build_train_iterator(empty, seq_len=16, global_batch_size=2, seed=0)

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"body": "no text here"}\n')
    bad = default_data_config()
    bad.sources = {"bad": source_config("jsonl", str(tmp_path / "bad.jsonl"))}
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: no string field 'text'"):
        build_train_iterator(bad, seq_len=16, global_batch_size=2, seed=0)

    with pytest.raises(ValueError, match="global_batch_size"):
        build_train_iterator(cfg, seq_len=16, global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="data.packing"):
        build_train_iterator(words_config(corpus_dir, packing="best"), seq_len=16, global_batch_size=2, seed=0)

    state = build_train_iterator(cfg, seq_len=16, global_batch_size=2, seed=0).get_state()
    with pytest.raises(ValueError, match="seed"):
        build_train_iterator(cfg, seq_len=16, global_batch_size=2, seed=1).set_state(state)
    other_data = words_config(corpus_dir, eval_fraction=0.3)
    with pytest.raises(ValueError, match="data_fingerprint"):
        build_train_iterator(other_data, seq_len=16, global_batch_size=2, seed=0).set_state(state)
    with pytest.raises(ValueError, match="held-out split is empty"):
        build_eval_iterator(words_config(corpus_dir, eval_fraction=0.0), seq_len=16, global_batch_size=2)
