"""prepare_data shards and the optional tokenizers/sources, on ../shared/data (Tiny Shakespeare, WikiText-2 valid)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nha_jax.data import build_eval_iterator, build_tokenizer, build_train_iterator, default_data_config, source_config
from nha_jax.data.prepare import main as prepare_main
from nha_jax.data.prepare import prepare_data
from nha_jax.data.sources import iter_documents
from nha_jax.data.store import ArrayRecordStore
from nha_jax.data.tokenizer import encode_document

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
WIKITEXT_VALID = DATA / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="module")
def bpe_tokenizer_file(tmp_path_factory):
    """A 512-token byte-level BPE trained on WikiText-2 valid, saved as a Hugging Face tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tokenizer.train_from_iterator(WIKITEXT_VALID.read_text().splitlines(), trainer=trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def direct_tokenization(source, tokenizer, add_bos=True, add_eos=True):
    return [encode_document(tokenizer, d.text, add_bos=add_bos, add_eos=add_eos) for d in iter_documents(source)]


def assert_shards_hold(out_dir, expected, tokenizer, manifest):
    assert manifest["num_documents"] == len(expected)
    assert manifest["num_tokens"] == sum(len(tokens) for tokens in expected)
    assert json.loads((out_dir / "manifest.json").read_text()) == manifest
    store = ArrayRecordStore(out_dir, tokenizer, add_bos=True, add_eos=True, name="test")
    np.testing.assert_array_equal(store.lengths, [len(tokens) for tokens in expected])
    for doc in np.random.default_rng(0).choice(len(expected), 200, replace=False):
        np.testing.assert_array_equal(store.read(doc, 0, store.lengths[doc]), expected[doc])


def test_prepare_tinyshakespeare_matches_direct_tokenization_and_trains(tmp_path):
    out = tmp_path / "shakespeare"
    manifest = prepare_data(str(SHAKESPEARE), out, text_split="blank_lines", workers=1, shard_mb=0.3, progress=False)
    tokenizer = build_tokenizer(default_data_config())
    expected = direct_tokenization(source_config("text", str(SHAKESPEARE), text_split="blank_lines"), tokenizer)
    assert len(manifest["shards"]) == 4 and manifest["token_dtype"] == "uint16"
    assert manifest["files"] == [{"path": str(SHAKESPEARE.resolve()), "bytes": SHAKESPEARE.stat().st_size}]
    assert_shards_hold(out, expected, tokenizer, manifest)

    cfg = default_data_config()
    cfg.sources = {"shakespeare": source_config("prepared", str(out))}
    cfg.read_threads = 1
    original = build_train_iterator(cfg, seq_len=64, global_batch_size=4, seed=0)
    batches = [next(original) for _ in range(3)]
    first_row = batches[0]["inputs"][0]
    second_segment = tokenizer.decode(first_row[batches[0]["segment_ids"][0] == 2])
    assert len(second_segment) > 10 and second_segment in SHAKESPEARE.read_text()
    assert next(build_eval_iterator(cfg, seq_len=64, global_batch_size=4))["loss_mask"].sum() > 0
    # shards moved to another mount, read by more threads: a checkpointed position resumes exactly
    shutil.copytree(out, tmp_path / "moved")
    cfg.sources = {"shakespeare": source_config("prepared", str(tmp_path / "moved"))}
    cfg.read_threads = 3
    moved = build_train_iterator(cfg, seq_len=64, global_batch_size=4, seed=0)
    moved.set_state({**original.get_state(), "next_row": 4})
    for expected in batches[1:]:
        actual = next(moved)
        for key in expected:
            np.testing.assert_array_equal(actual[key], expected[key])


def test_prepare_wikitext_with_a_bpe_tokenizer_on_two_workers(tmp_path, bpe_tokenizer_file):
    out = tmp_path / "wikitext"
    manifest = prepare_data(str(WIKITEXT_VALID), out, tokenizer=str(bpe_tokenizer_file), text_split="blank_lines",
                            workers=2, shard_mb=0.4, progress=False)
    cfg = default_data_config()
    cfg.tokenizer = str(bpe_tokenizer_file)
    tokenizer = build_tokenizer(cfg)
    assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (512, 0, 1, 2)
    assert tokenizer.decode(tokenizer.encode(" The tower , built in 1889")) == " The tower , built in 1889"
    expected = direct_tokenization(source_config("text", str(WIKITEXT_VALID), text_split="blank_lines"), tokenizer)
    assert len(manifest["shards"]) == 3
    assert manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint
    assert_shards_hold(out, expected, tokenizer, manifest)


def test_prepare_resumes_skipping_finished_shards(tmp_path):
    out = tmp_path / "resume"
    first = prepare_data(str(WIKITEXT_VALID), out, text_split="blank_lines", workers=1, shard_mb=0.25, progress=False)
    shard_files = sorted(out.glob("shard-*.array_record"))
    assert len(shard_files) == 5
    # an interrupted run: the last shard and the manifest never written, a half-written temp file left behind
    shard_files[-1].unlink()
    (out / "manifest.json").unlink()
    (out / (shard_files[-1].name + ".tmp")).write_bytes(b"partial")
    finished_times = {path: path.stat().st_mtime_ns for path in shard_files[:-1]}
    resumed = prepare_data(str(WIKITEXT_VALID), out, text_split="blank_lines", workers=1, shard_mb=0.25,
                           progress=False)
    assert resumed == first
    assert {path: path.stat().st_mtime_ns for path in shard_files[:-1]} == finished_times
    assert shard_files[-1].is_file() and not (out / (shard_files[-1].name + ".tmp")).exists()
    with pytest.raises(ValueError, match="other inputs or settings"):
        prepare_data(str(WIKITEXT_VALID), out, text_split="file", workers=1, shard_mb=0.25, progress=False)


def test_training_refuses_shards_from_another_tokenizer(tmp_path, bpe_tokenizer_file):
    out = tmp_path / "bytes"
    prepare_data("embedded", out, workers=1, progress=False)
    cfg = default_data_config()
    cfg.sources = {"pydoc": source_config("prepared", str(out))}
    cfg.tokenizer = str(bpe_tokenizer_file)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        build_train_iterator(cfg, seq_len=32, global_batch_size=2, seed=0)
    cfg.tokenizer = "byte"
    cfg.add_bos = False
    with pytest.raises(ValueError, match="add_bos"):
        build_train_iterator(cfg, seq_len=32, global_batch_size=2, seed=0)
    cfg.sources = {"pydoc": source_config("prepared", str(tmp_path / "never_prepared"))}
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        build_train_iterator(cfg, seq_len=32, global_batch_size=2, seed=0)


def test_prepare_cli_reports_bad_input(tmp_path, capsys):
    assert prepare_main(["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    empty_input = ["--input", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o2"), "--workers", "1"]
    assert prepare_main(empty_input) == 2
    assert "empty" in capsys.readouterr().err


def test_sentencepiece_tokenizer_trains_and_feeds_batches(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    lines = [line for line in SHAKESPEARE.read_text().splitlines()[:6000] if line.strip()]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "spm"),
                                             vocab_size=300, model_type="bpe", character_coverage=1.0,
                                             unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    cfg = default_data_config()
    cfg.tokenizer = str(tmp_path / "spm.model")
    cfg.sources = {"shakespeare": source_config("text", str(SHAKESPEARE), text_split="blank_lines")}
    tokenizer = build_tokenizer(cfg)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (300, 1, 2, 2)
    assert tokenizer.decode(tokenizer.encode("First Citizen: speak.")) == "First Citizen: speak."
    batch = next(build_train_iterator(cfg, seq_len=32, global_batch_size=2, seed=0))
    assert batch["inputs"].max() < 300 and batch["loss_mask"].sum() > 0


def test_parquet_source_and_missing_column(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    texts = [" ".join(["word"] * n) for n in range(1, 40)]
    parquet.write_table(pyarrow.table({"content": texts, "n": list(range(39))}), tmp_path / "docs.parquet")
    cfg = default_data_config()
    cfg.eval_fraction = 0.0
    cfg.sources = {"pq": source_config("parquet", str(tmp_path / "*.parquet"), text_field="content")}
    tokenizer = build_tokenizer(cfg)
    expected = np.concatenate([encode_document(tokenizer, t, add_bos=True, add_eos=True) for t in texts])
    # one row as long as the corpus holds the whole (shuffled) epoch
    inputs = next(build_train_iterator(cfg, seq_len=len(expected), global_batch_size=1, seed=0))["inputs"][0]
    np.testing.assert_array_equal(np.sort(inputs), np.sort(expected))
    assert np.sum(inputs == tokenizer.bos_id) == len(texts)
    cfg.sources.pq.text_field = "text"
    with pytest.raises(ValueError, match="no column 'text'"):
        build_train_iterator(cfg, seq_len=8, global_batch_size=1, seed=0)
