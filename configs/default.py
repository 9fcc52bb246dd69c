"""Default: a tiny NHA LM (1.2M params, 4 layers: three with window 32 + 16 slots, one full) on Python's own
documentation, byte-level tokens; nothing to download.

Reproduces: the README's smoke run. Command: `python train.py --config configs/default.py`.
Hardware and time: a 2-core CPU. Measured (2026-11-26): 2m37s of CPU time, 5 min wall while the 2 cores were
shared with other jobs; expect 2-3 min on free cores. float32 compute (CPUs have no fast bf16 matmul; the
accelerator configs use bf16).
Expect: loss from ~6 (uniform over the padded 384-entry vocab) to ~2 nats/byte by step 300 (noisy: the documents
differ a lot), eval loss ~2.5; checkpoints at steps 100/200/300 in runs/default/checkpoints, metrics in
runs/default/metrics.jsonl, the per-layer long-term attention share every 100 steps, a final summary line.
"""
from configs.common import base_config


def get_config():
    config = base_config()
    config.workdir = "runs/default"
    config.seq_len = 128
    config.global_batch_size = 8
    config.total_steps = 300
    config.log_every = 10
    config.eval_every = 100
    config.diagnostic_every = 100
    config.checkpoint_every = 100
    config.model.chunk_size = 16
    config.model.compute_dtype = "float32"
    config.optimizer.peak_lr = 3e-3
    config.optimizer.warmup_steps = 30
    return config
