"""NHA-1.3B (NHA_SPEC section 5): 24 layers, d_model 2048, 32 query / 8 kv heads of 64, m = 64 slots, window 32,
every 6th layer full (2048); AdamW 3e-4 (0.9, 0.95), wd 0.01, clip 1.0, warmup 1024, cosine to 10%;
2^19 tokens per step, 190735 steps = 100B tokens.

Reproduces: the paper's 1.3B NHA row (commonsense avg 52.89, recall avg 46.43, wiki ppl 16.16) in shape.
Command: python train.py --config configs/nha_1p3b.py (plus the data overrides of configs/nha_340m.py).
Hardware and time: 32+ H100s or a TPU v5p-64 class slice, FSDP over all devices; not measured here (time =
100B tokens / measured tokens/s, see bench/bench_train.py).
Expect: wiki perplexity ~16 after 100B SlimPajama tokens; below GSA and Transformer++ at the same tokens.
"""
from configs.common import base_config, paper_340m


def get_config():
    config = paper_340m(base_config())
    config.workdir = "runs/nha_1p3b"
    config.total_steps = 190735
    config.model.d_model = 2048
    config.model.num_heads = 32
    config.model.num_kv_heads = 8
    return config
