"""NHA-Llama-3-8B (NHA_SPEC section 5): Llama-3-8B's weights as an NHA hybrid, finetuned with the FFN frozen.

The LLM variant: v without SiLU, no output norm, Llama-3's RoPE base 500000 and RMSNorm eps 1e-5, untied head;
4 of 32 layers keep a full window (l % 8 == 7: layers 7, 15, 23, 31), the other 28 get a 32-token window and
m = 64 slots whose gates are initialised from k_proj rows. Every MLP matrix is frozen by optimizer masking
(zero gradients into clipping, zero updates out of AdamW); attention, gates, norms, embedding and head train at
lr 3e-5.

Reproduces: the paper's Llama-3-8B hybridization in shape (10B tokens; here 2^19 tokens per step, 19073 steps).
Commands (docs/CONVERT.md):
  python -m nha_jax.convert import /models/Meta-Llama-3-8B converted/llama3_8b_nha --num-slots 64 --window 32 \
      --block-size 8 --full-idx 7
  python train.py --config configs/llama3_8b_nha_finetune.py \
      --config.data.tokenizer=/models/Meta-Llama-3-8B/tokenizer.json --config.data.sources.pydoc.kind=prepared \
      --config.data.sources.pydoc.path=/data/slimpajama_llama3
The model keys below must equal the converted folder's nha_model.json (the restore names any mismatched tensor).
Hardware and time: float32 params (32 GB) + gradients (32 GB) + AdamW moments (64 GB; the frozen ones stay zero
but are allocated) is ~130 GB before activations: an 8 x H100 node, fsdp over all devices. 6 * 8e9 * 1e10 =
4.8e20 FLOPs is about two days at 35% MFU on 8 H100s (an estimate, not measured).
Expect: NHA_SPEC section 5 reports commonsense 70.31 / recall 57.64 against Llama-3-8B's 71.30 / 60.08.
"""
from configs.common import base_config


def get_config():
    config = base_config()
    config.workdir = "runs/llama3_8b_nha"
    config.init_params = "converted/llama3_8b_nha/params"
    config.seq_len = 2048
    config.global_batch_size = 256
    config.total_steps = 19073  # 10B tokens at 2^19 tokens per step
    config.log_every = 50
    config.eval_every = 1000
    config.diagnostic_every = 1000
    config.checkpoint_every = 1000

    model = config.model
    model.vocab_size = 128256
    model.d_model = 4096
    model.num_layers = 32
    model.num_heads = 32
    model.num_kv_heads = 8
    model.head_dim = 128
    model.v_head_dim = 128
    model.mlp_hidden = 14336
    model.num_slots = 64
    model.window = 32
    model.block_size = 8  # the full-layer schedule: layers 7, 15, 23, 31 keep a full window
    model.full_idx = 7
    model.rope_theta = 500000.0
    model.norm_eps = 1e-5
    model.value_silu = False
    model.output_norm = False
    model.qkv_bias = False
    model.tie_embeddings = False
    model.compute_dtype = "bfloat16"
    model.remat = "full"

    config.optimizer.peak_lr = 3e-5
    config.optimizer.warmup_steps = 200
    config.optimizer.frozen = ("/mlp/",)  # blocks/<l>/mlp/{gate,up,down}/kernel; mlp_norm still trains

    config.mesh.data = 1
    config.mesh.fsdp = -1
    return config
