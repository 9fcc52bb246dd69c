"""NHA-340M (NHA_SPEC section 5): 24 layers, d_model 1024, 16 query / 4 kv heads of 64, m = 64 slots, window 32,
every 6th layer (l % 6 == 5) a full 2048 window; AdamW 3e-4, betas (0.9, 0.95), wd 0.01, clip 1.0, warmup 1024,
cosine to 10%; 256 x 2048 tokens per step (2^19), 30720 steps = 15B tokens.

Reproduces: the paper's 340M NHA run in shape. The paper trains on SlimPajama with the Llama-2 tokenizer: point
config.data at such a corpus and tokenizer (docs/DATA.md); the default data is the small embedded corpus.
Command: python train.py --config configs/nha_340m.py --config.data.tokenizer=/path/to/tokenizer.model ...
Hardware and time: 8 x H100 or a TPU v5p-16 class slice (FSDP over all devices). Time = 15B tokens / tokens/s;
measured on one H100 (2026-11-27, bench/bench_train.py, 8 x 2048 tokens per step, remat as here): 136.9k tokens/s
(26.9% MFU), i.e. about 3.8 hours on 8 GPUs if that rate held per GPU under FSDP (the scaling run, 2026-11-26,
older kernels and matmuls, measured 41.3k per GPU over 4, not redone since). grad_accum_steps and model.remat trade
memory for speed (model.remat=dots_and_attention keeps the attention kernels from running twice: on that H100,
118.2 ms a step against 119.5 as here, at 16.9 against 14.9 GiB; none, with older kernels: 118.3 ms, 24.7 GiB).
Expect: NHA_SPEC section 5 reports the 1.3B results; at 340M expect wikitext perplexity a little below the
Transformer++ and GSA 340M baselines (configs/transformer_340m.py, configs/gsa_340m.py) at the same tokens.
"""
from configs.common import base_config, paper_340m


def get_config():
    config = paper_340m(base_config())
    config.workdir = "runs/nha_340m"
    return config
