"""The shared config skeleton: every key the trainer reads, with defaults. Each configs/<name>.py edits a copy.

Configs are data: no logic here beyond arithmetic on sizes. `python train.py --config configs/x.py
--config.model.d_model=512` overrides any key; an unknown key or a bad value exits with code 2.
"""
import ml_collections

from nha_jax.data import default_data_config


def base_config() -> ml_collections.ConfigDict:
    """All trainer keys with their defaults (a small NHA LM on the embedded corpus)."""
    config = ml_collections.ConfigDict()
    config.workdir = "runs/default"
    config.seed = 0
    config.seq_len = 256
    config.global_batch_size = 16  # rows per optimizer step, all hosts and microbatches together
    config.grad_accum_steps = 1  # microbatches per step, scanned inside the one jitted step
    config.total_steps = 300
    config.log_every = 10
    config.eval_every = 100  # 0 = no eval
    config.eval_batches = 4
    config.diagnostic_every = 100  # long-term attention share per layer; 0 = off
    config.diagnostic_tokens = 256
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.progress_bar = True
    config.init_params = ""  # a params checkpoint (nha_jax.convert import) to start from instead of random init

    config.model = ml_collections.ConfigDict()
    config.model.vocab_size = 0  # 0 = the tokenizer's vocab size; larger values pad the embedding
    config.model.d_model = 128
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.num_kv_heads = 4
    config.model.head_dim = 32
    config.model.v_head_dim = 32
    config.model.mlp_hidden = 0  # 0 = 2/3 * 4 * d_model rounded up to a multiple of 256
    config.model.num_slots = 16  # m, per kv head; 0 = no slots (sliding-window / Transformer++)
    config.model.window = 32  # W of the non-full layers
    config.model.block_size = 4  # layer l is full (W = seq_len) when l % block_size == full_idx; 0 = no full layers
    config.model.full_idx = 3
    config.model.windows = ()  # explicit per-layer windows; overrides window / block_size / full_idx when set
    config.model.gate_temperature = 8.0
    config.model.rope_theta = 10000.0
    config.model.init_std = 0.02
    config.model.attention_impl = "auto"
    config.model.chunk_size = 64
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable | dots_and_attention
    config.model.scan_layers = False  # True: lax.scan over groups of one window-schedule period (docs/TRAINING.md)
    # The LLM variant of a converted Hugging Face model (nha_jax.convert, docs/CONVERT.md); defaults = plain NHA.
    config.model.value_silu = True  # v = SiLU(W_v x); False: v = W_v x
    config.model.output_norm = True  # y = W_o RMSNorm(SiLU(o)); False: y = W_o o
    config.model.qkv_bias = False  # biases on the q/k/v projections (Qwen2)
    config.model.norm_eps = 1e-6  # every RMSNorm's epsilon
    config.model.tie_embeddings = False  # logits = h @ embed^T, no separate head
    config.model.rope_scaling = ml_collections.ConfigDict(dict(  # kind "llama3" rescales RoPE as Llama-3.1 does
        kind="none", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192))

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.peak_lr = 3e-4
    config.optimizer.warmup_steps = 1024
    config.optimizer.end_lr_ratio = 0.1
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.01
    config.optimizer.clip_norm = 1.0
    config.optimizer.frozen = ()  # regexes over parameter paths that get no updates, e.g. ("/mlp/",)

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1 = fill with the remaining devices
    config.mesh.fsdp = 1
    config.mesh.tensor = 1

    config.data = default_data_config()
    return config


def paper_340m(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The 340M shape and optimiser of NHA_SPEC section 5 (Llama-2 32k vocab, 2^19 tokens per step)."""
    config.seq_len = 2048
    config.global_batch_size = 256
    config.total_steps = 30720
    config.log_every = 50
    config.eval_every = 1000
    config.diagnostic_every = 1000
    config.checkpoint_every = 1000
    config.model.vocab_size = 32000
    config.model.d_model = 1024
    config.model.num_layers = 24
    config.model.num_heads = 16
    config.model.num_kv_heads = 4
    config.model.head_dim = 64
    config.model.v_head_dim = 64
    config.model.num_slots = 64
    config.model.window = 32
    config.model.block_size = 6
    config.model.full_idx = 5
    config.model.remat = "dots_with_no_batch_dims_saveable"
    config.optimizer.peak_lr = 3e-4
    config.optimizer.warmup_steps = 1024
    config.mesh.data = 1
    config.mesh.fsdp = -1
    return config
