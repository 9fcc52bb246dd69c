"""GSA-340M baseline: Gated Slot Attention, i.e. NHA with window 0 in every layer (m = 64 slots, no full layers).

Command: python train.py --config configs/gsa_340m.py (plus the data overrides of configs/nha_340m.py).
Hardware and time: as configs/nha_340m.py. Expect: the paper's GSA row in shape (NHA_SPEC section 5): good
perplexity, clearly weaker recall than NHA and the hybrids.
"""
from configs.common import base_config, paper_340m


def get_config():
    config = paper_340m(base_config())
    config.workdir = "runs/gsa_340m"
    config.model.window = 0
    config.model.block_size = 0  # no full layers
    return config
