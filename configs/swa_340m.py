"""Sliding-window-attention-340M baseline: no slots (m = 0), a 512-token window in every layer.

The window is the one knob of the hybrid left without its long-term memory: comparing with configs/nha_340m.py
shows what the slots add. Command: python train.py --config configs/swa_340m.py (plus the data overrides of
configs/nha_340m.py). Hardware and time: as configs/nha_340m.py. Expect: perplexity near Transformer++ at 2K,
poor recall beyond the window.
"""
from configs.common import base_config, paper_340m


def get_config():
    config = paper_340m(base_config())
    config.workdir = "runs/swa_340m"
    config.model.num_slots = 0
    config.model.window = 512
    config.model.block_size = 0
    return config
