"""Hugging Face conversion: tiny random Llama / Qwen2 models made by transformers on the CPU (no downloads).

With every layer full and no slots, nha-jax is the host Transformer: logits match the Hugging Face ones. Import ->
export round-trips every tensor bitwise and transformers loads the result; bad checkpoints fail by name; a
converted hybrid finetunes through the trainer with the FFN frozen.
"""
import copy
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from safetensors.numpy import load_file, save_file  # noqa: E402

from nha_jax.convert import (MissingTensorError, UnsupportedArchitectureError, export_checkpoint,  # noqa: E402
                             import_checkpoint, load_model_config, load_params, model_config_from_hf, params_from_hf)
from nha_jax.convert.__main__ import main as convert_cli  # noqa: E402
from nha_jax.model import LanguageModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ lives at the repo root, outside the installed package
from nha_jax.training import train  # noqa: E402
from nha_jax.training.checkpoint import save_params  # noqa: E402
from nha_jax.training.config import load_config_file  # noqa: E402

VOCAB = 384  # covers the byte tokenizer's 259 ids, so the trainer runs the converted model on the embedded corpus
SEQ = 24
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.1)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8}


def make_hf_model(kind: str, folder: Path):
    """A random 2-layer GQA model saved to `folder`; Qwen2 gets non-zero q/k/v biases and a tied head."""
    torch.manual_seed(0)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True))
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    else:
        scaling = {"rope_scaling": LLAMA3_SCALING} if kind == "llama3_scaled" else {}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, rope_theta=500000.0, **scaling))
    model.eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: (root / kind, make_hf_model(kind, root / kind)) for kind in ("llama", "llama3_scaled", "qwen2")}


def hf_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def nha_logits(model_cfg, params, tokens, segment_ids=None) -> np.ndarray:
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(model_cfg, seq_len=SEQ, rngs=nnx.Rngs(0))))
    return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens), segment_ids))


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def transformer_config(folder: Path, **changes):
    """Every layer full (block_size 1) and no slots: exactly the host Transformer; float32, the chunked path."""
    model_cfg = model_config_from_hf(hf_config(folder), num_slots=0, window=4, block_size=1, full_idx=0,
                                     compute_dtype="float32")
    model_cfg.update(attention_impl="chunked", chunk_size=8, **changes)
    return model_cfg


@pytest.mark.parametrize("kind", ["llama", "llama3_scaled", "qwen2"])
def test_full_window_without_slots_matches_hf_logits(hf_models, kind):
    folder, model = hf_models[kind]
    model_cfg = transformer_config(folder)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ))
    reference = hf_logits(model, tokens)
    assert np.abs(reference).max() > 1.0  # logits big enough that a wrong layer would show
    np.testing.assert_allclose(nha_logits(model_cfg, params_from_hf(folder, model_cfg), tokens), reference,
                               atol=1e-4, rtol=0)
    # Packed documents: each segment gives the logits the Hugging Face model gives that document alone.
    segment_ids = jnp.asarray(np.repeat([[0, 1]], SEQ // 2, axis=1))
    packed = nha_logits(model_cfg, params_from_hf(folder, model_cfg), tokens[:1], segment_ids)
    np.testing.assert_allclose(packed[0, SEQ // 2:], hf_logits(model, tokens[:1, SEQ // 2:])[0], atol=1e-4, rtol=0)


def test_llama3_rope_scaling_is_not_plain_rope(hf_models):
    """The scaled frequencies matter at these positions: plain RoPE of the same base misses the HF logits."""
    folder, model = hf_models["llama3_scaled"]
    model_cfg = transformer_config(folder)
    model_cfg.rope_scaling.kind = "none"
    tokens = np.random.default_rng(0).integers(0, VOCAB, (1, SEQ))
    difference = np.abs(nha_logits(model_cfg, params_from_hf(folder, model_cfg), tokens) - hf_logits(model, tokens))
    assert difference.max() > 1e-3


def test_hybrid_gates_come_from_k_proj_rows(hf_models):
    folder, _ = hf_models["llama"]
    model_cfg = model_config_from_hf(hf_config(folder), num_slots=64, window=4, block_size=2, full_idx=1)
    params = params_from_hf(folder, model_cfg)
    k_weight = load_file(str(folder / "model.safetensors"))["model.layers.0.self_attn.k_proj.weight"]  # [Hkv*dk, D]
    gate = np.asarray(params["blocks"][0]["attn"]["gate_proj"]["kernel"][...])  # [D, Hkv*m]
    head_dim, slots = 16, 64
    for kv_head in range(2):
        for slot in (0, 15, 16, 63):  # m = 64 > dk = 16: slots cycle through their head's 16 key rows
            np.testing.assert_array_equal(gate[:, kv_head * slots + slot],
                                          k_weight[kv_head * head_dim + slot % head_dim])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_export_round_trip_is_bitwise_and_loads_in_transformers(hf_models, tmp_path, dtype):
    folder, model = hf_models["qwen2"]
    if dtype != torch.float32:  # a checkpoint stored in bfloat16 goes through float32 params and back exactly
        folder = tmp_path / "source"
        copy.deepcopy(model).to(dtype).save_pretrained(folder)
    assert convert_cli(["import", str(folder), str(tmp_path / "nha"), "--num-slots", "8", "--window", "4",
                        "--block-size", "2", "--full-idx", "1"]) == 0
    # Finetuning changes the gates, which transformers has no place for: they travel in nha_gates.safetensors.
    trained = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 1.0 if "gate_proj" in jax.tree_util.keystr(path) else x, load_params(tmp_path / "nha"))
    save_params(str(tmp_path / "trained"), trained)
    export_checkpoint(tmp_path / "nha", tmp_path / "hf", params_dir=tmp_path / "trained",
                      shard_bytes=100_000)  # small shards: exercises the index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()

    original = load_file(str(folder / "model.safetensors"))
    exported = {}
    for shard in sorted((tmp_path / "hf").glob("model-*.safetensors")):
        exported.update(load_file(str(shard)))
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and np.array_equal(exported[name], tensor), name

    # Loaded the same way, the export and its source are the same model.
    reloaded, source = (transformers.AutoModelForCausalLM.from_pretrained(path).eval()
                        for path in (tmp_path / "hf", folder))
    assert type(reloaded) is type(model)
    tokens = np.random.default_rng(1).integers(0, VOCAB, (1, SEQ))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(source, tokens))

    # Re-importing the export takes the trained gates instead of fresh k_proj rows: every param round-trips.
    assert convert_cli(["import", str(tmp_path / "hf"), str(tmp_path / "nha2"), "--num-slots", "8", "--window", "4",
                        "--block-size", "2", "--full-idx", "1"]) == 0
    jax.tree.map(np.testing.assert_array_equal, load_params(tmp_path / "nha2"), trained)


def test_bad_checkpoints_fail_naming_the_problem(hf_models, tmp_path, capsys):
    folder, _ = hf_models["llama"]
    config = hf_config(folder)
    with pytest.raises(UnsupportedArchitectureError, match="model_type='mistral'"):
        model_config_from_hf({**config, "model_type": "mistral"}, num_slots=0, window=4, block_size=1, full_idx=0)
    with pytest.raises(UnsupportedArchitectureError, match="rope_type='yarn'"):
        model_config_from_hf({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, num_slots=0,
                             window=4, block_size=1, full_idx=0)

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    model_cfg = transformer_config(broken)
    with pytest.raises(MissingTensorError, match="model.layers.1.mlp.up_proj.weight"):
        params_from_hf(broken, model_cfg)

    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    assert convert_cli(["import", str(broken), str(tmp_path / "out"), "--num-slots", "0", "--block-size", "1",
                        "--full-idx", "0"]) == 2
    assert ("tensor 'model.layers.0.mlp.down_proj.weight' has shape (96, 64) but the model config needs (128, 64)"
            in capsys.readouterr().err)


def test_converted_hybrid_finetunes_with_ffn_frozen(hf_models, tmp_path):
    """The finetune config through the trainer: the FFN matrices are bitwise unchanged, everything else moves."""
    folder, _ = hf_models["llama"]
    import_checkpoint(folder, tmp_path / "nha", num_slots=64, window=4, block_size=2, full_idx=1,
                      compute_dtype="float32")
    config = load_config_file(str(REPO / "configs" / "llama3_8b_nha_finetune.py"))
    config.model = load_model_config(tmp_path / "nha")
    config.model.update(chunk_size=8, remat="none")
    config.update(workdir=str(tmp_path / "run"), init_params=str(tmp_path / "nha" / "params"), seq_len=SEQ,
                  global_batch_size=8, total_steps=3, log_every=1, eval_every=0, diagnostic_every=0,
                  checkpoint_every=0, async_checkpoints=False, progress_bar=False)
    config.optimizer.update(warmup_steps=1, peak_lr=1e-2)  # large enough that every trained tensor moves
    config.mesh.update(data=-1, fsdp=1)
    summary = train(config)
    assert summary["final_step"] == 3

    start = load_params(tmp_path / "nha")
    final = load_params(tmp_path / "nha", tmp_path / "run" / "checkpoints" / "3")
    flat_start = dict(jax.tree_util.tree_flatten_with_path(start)[0])
    for path, after in jax.tree_util.tree_flatten_with_path(final)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        before = np.asarray(flat_start[path])
        if "/mlp/" in name:
            np.testing.assert_array_equal(np.asarray(after), before, err_msg=name)
        else:
            assert not np.array_equal(np.asarray(after), before), f"{name} did not train"
