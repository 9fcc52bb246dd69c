"""Transformer++-340M baseline: the NHA-340M config with no slots (m = 0) and every layer's window full (2048).

Same code path as NHA (SiLU on v and the output RMSNorm stay; NHA_SPEC section 1), so the comparison isolates the
attention memory. With impl="auto" on GPU the operator routes m = 0 full-window layers to cuDNN attention.
Command: python train.py --config configs/transformer_340m.py (plus the data overrides of configs/nha_340m.py).
Hardware and time: as configs/nha_340m.py. Expect: the paper's Transformer++ row in shape (NHA_SPEC section 5):
slightly worse perplexity and recall than NHA at equal tokens.
"""
from configs.common import base_config, paper_340m


def get_config():
    config = paper_340m(base_config())
    config.workdir = "runs/transformer_340m"
    config.model.num_slots = 0
    config.model.block_size = 1  # every layer l satisfies l % 1 == 0: all full windows
    config.model.full_idx = 0
    return config
