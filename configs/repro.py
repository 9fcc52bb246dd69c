"""Small-scale reproduction (docs/RESULTS.md): NHA against GSA, sliding window and Transformer++ at equal state
size, ~20M parameters, byte tokens, same steps and batch for all; run by eval/repro.py.

The variant is one key, applied as overrides (VARIANTS) on this config: NHA m = 32 slots + W = 32 window per
layer; GSA m = 64, W = 0; sliding window m = 0, W = 64 (all three: 64 state entries per head, no full layer);
Transformer++ every layer full. Text: WikiText-2 valid from ../shared/data (test held out for perplexity).
Command: python eval/repro.py --out runs/repro [--tasks mqar,text] [--variants nha,...]. Hardware and time: one
H100/H200; each 300-step run takes about 1 minute on an H100 with the "auto" operator (the Pallas kernels for
NHA/GSA, cuDNN for the m = 0 layers), compilation and evaluation included, so the eight runs take ~9 minutes
(--set model.attention_impl=chunked restores the slower XLA path).
Expect (300 steps, one seed, docs/RESULTS.md): WikiText-2 test byte perplexity NHA 4.06, sliding window 4.11,
Transformer++ 4.16, GSA 4.30; MQAR near chance for every model, NHA ahead of GSA and sliding window and within
0.013 of Transformer++ at every setting (e.g. 0.122 against 0.025, 0.118 and 0.133 recall at 8 pairs).
"""
from pathlib import Path

from configs.common import base_config
from nha_jax.data import source_config

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

VARIANTS = {
    "nha": ["model.num_slots=32", "model.window=32"],
    "gsa": ["model.num_slots=64", "model.window=0"],
    "swa": ["model.num_slots=0", "model.window=64"],
    "transformer": ["model.num_slots=0", "model.block_size=1", "model.full_idx=0"],
}


def get_config():
    config = base_config()
    config.workdir = "runs/repro/nha_text"
    config.seq_len = 512
    config.global_batch_size = 32
    config.total_steps = 300
    config.log_every = 50
    config.eval_every = 0
    config.diagnostic_every = 0
    config.checkpoint_every = 0
    config.keep_checkpoints = 1
    config.progress_bar = False
    config.model.d_model = 512
    config.model.num_layers = 6
    config.model.num_heads = 8
    config.model.num_kv_heads = 8
    config.model.head_dim = 64
    config.model.v_head_dim = 64
    config.model.num_slots = 32
    config.model.window = 32
    config.model.block_size = 0  # no full layers: the variants differ only in how each layer remembers
    config.model.attention_impl = "auto"
    config.model.chunk_size = 64
    config.model.compute_dtype = "bfloat16"
    config.optimizer.peak_lr = 1e-3
    config.optimizer.warmup_steps = 30
    config.data.sources = {"wikitext": source_config("text", str(DATA / "wikitext-2" / "valid.txt"),
                                                     text_split="blank_lines")}
    return config
