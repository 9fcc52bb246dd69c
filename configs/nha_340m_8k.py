"""NHA-340M at long context: T = 8192 (the full layers' window grows with it), 64 x 8192 tokens per step (2^19,
as at 2K), the same 15B tokens (30720 steps).

Reproduces: the long-context setting (RULER-style evaluation beyond 2K, NHA_SPEC section 5) with training at 8K.
Command: python train.py --config configs/nha_340m_8k.py (plus the data overrides of configs/nha_340m.py).
Hardware and time: 8 x H100 class; per token only the 4 full layers cost more than at 2K (docs/TRAINING.md gives
the FLOP count); not measured here. Full remat keeps the activations in memory.
Expect: loss at 8K close to the 2K run's; recall at 8K far above the 2K-trained baselines'.
"""
from configs.common import base_config, paper_340m


def get_config():
    config = paper_340m(base_config())
    config.workdir = "runs/nha_340m_8k"
    config.seq_len = 8192
    config.global_batch_size = 64
    config.model.remat = "full"
    return config
