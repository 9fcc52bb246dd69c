"""NHA-340M (NHA_SPEC section 5): 24 layers, d_model 1024, 16 query / 4 kv heads of 64, m = 64 slots, window 32,
every 6th layer (l % 6 == 5) a full 2048 window; AdamW 3e-4, betas (0.9, 0.95), wd 0.01, clip 1.0, warmup 1024,
cosine to 10%; 256 x 2048 tokens per step (2^19), 30720 steps = 15B tokens.

Reproduces: the paper's 340M NHA run in shape (the paper trains on SlimPajama with the Llama-2 tokenizer; point
config.data at such a corpus: docs/DATA.md). Command:
  python train.py --config configs/nha_340m.py --config.data.tokenizer=/path/llama2/tokenizer.model \
      --config.data.sources.pydoc.kind=prepared --config.data.sources.pydoc.path=/data/slimpajama
Hardware and time: one 8-GPU H100 node at ~40% MFU is roughly 1.5 days for 15B tokens (see
docs/PERFORMANCE.md for the measured single-GPU throughput); grad_accum_steps trades memory for steps.
Expect: NHA_SPEC section 5 reports the 1.3B results; at 340M expect wikitext perplexity a little below the
Transformer++ and GSA 340M baselines (configs/transformer_340m.py, configs/gsa_340m.py) at the same tokens.
"""
from configs.common import base_config, paper_340m


def get_config():
    config = paper_340m(base_config())
    config.workdir = "runs/nha_340m"
    return config
