"""Input-pipeline throughput on the CPU: prepare_data tokens/s and training-time reader tokens/s.

    JAX_PLATFORMS=cpu python bench/bench_data.py [--seq-len 2048] [--global-batch 256] [--steps 10]

Corpus: Tiny Shakespeare + WikiText-2 valid/test from ../shared/data (about 3.5 MB of text). Tokenizers: byte-level
and a byte-level BPE trained here on WikiText-2 valid (vocab --bpe-vocab). The reader is compared with the 340M
model's training tokens/s on one H100, estimated as 0.40 * 989e12 / (6 * 340e6) unless --model-tokens-per-s is given.
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from nha_jax.data import build_train_iterator, default_data_config, source_config
from nha_jax.data.prepare import prepare_data

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPUS = [DATA / "tinyshakespeare" / "input.txt", DATA / "wikitext-2" / "valid.txt", DATA / "wikitext-2" / "test.txt"]
H100_BF16_DENSE_FLOPS = 989e12


def train_bpe(path: Path, vocab_size: int) -> Path:
    import tokenizers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tokenizer.train_from_iterator(CORPUS[1].read_text().splitlines(), trainer=trainer)
    tokenizer.save(str(path))
    return path


def time_prepare(out: Path, tokenizer: str, workers: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = prepare_data(",".join(map(str, CORPUS)), out, tokenizer=tokenizer, text_split="blank_lines",
                            workers=workers, shard_mb=0.5, progress=False)
    return time.perf_counter() - start, manifest["num_tokens"]


def time_reader(out: Path, tokenizer: str, packing: str, args) -> float:
    cfg = default_data_config()
    cfg.tokenizer = tokenizer
    cfg.packing = packing
    cfg.sources = {"bench": source_config("prepared", str(out))}
    iterator = build_train_iterator(cfg, seq_len=args.seq_len, global_batch_size=args.global_batch, seed=0)
    for _ in range(3):  # warm-up: plans, caches, grain's thread pool
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(iterator)
    return args.steps * args.global_batch * args.seq_len / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=256, help="rows per step (the 340M config: 256)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bpe-vocab", type=int, default=8192)
    parser.add_argument("--model-tokens-per-s", type=float, default=None,
                        help="measured 340M training tokens/s on one H100 (default: the 40%% MFU estimate)")
    args = parser.parse_args()
    model_tokens_per_s = args.model_tokens_per_s or 0.40 * H100_BF16_DENSE_FLOPS / (6 * 340e6)
    model_label = "measured" if args.model_tokens_per_s else "estimate, 6*N*tokens at 40% MFU"
    work = Path(tempfile.mkdtemp(prefix="nha_bench_data_"))
    try:
        bpe = str(train_bpe(work / "bpe.json", args.bpe_vocab))
        rows = []
        for name, tokenizer in (("byte", "byte"), (f"bpe{args.bpe_vocab}", bpe)):
            out = work / name
            for workers in (1, 2):
                seconds, tokens = time_prepare(out, tokenizer, workers)
                rows.append((f"prepare_data {name} workers={workers}", tokens / seconds,
                             f"{tokens} tokens {seconds:.1f}s"))
            for packing in ("concat", "document"):
                rate = time_reader(out, tokenizer, packing, args)
                rows.append((f"reader {name} {packing} T={args.seq_len} B={args.global_batch}", rate,
                             f"{rate / model_tokens_per_s:.0f}x the 340M H100 rate"))
        rows.append(("340M model on one H100", model_tokens_per_s, model_label))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ncpus={os.cpu_count()} load average={os.getloadavg()[0]:.1f}")
    print(f"{'what':<48} {'tokens/s':>12}  note")
    for what, rate, note in rows:
        print(f"{what:<48} {rate:>12,.0f}  {note}")


if __name__ == "__main__":
    main()
