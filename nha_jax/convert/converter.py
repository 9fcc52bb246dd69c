"""Import a Hugging Face Llama / Qwen2 checkpoint into nha-jax parameters, and export them back.

A converted folder holds what the trainer and the exporter need:
  nha_model.json   the nha-jax `config.model` (LLM variant, slots and window schedule)
  hf_config.json   the source config.json, verbatim (the exporter writes it back)
  hf_files/        tokenizer and generation files of the source, copied through untouched
  params/          the parameters (nha_jax.training.checkpoint.save_params; config.init_params points here)
An exported folder is a Hugging Face checkpoint (config.json + safetensors) plus, for a hybrid, the NHA gates in
nha_gates.safetensors and nha_model.json, which transformers ignores and a re-import picks up.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import load_file, save_file

from nha_jax.convert.architecture import checkpoint_dtype, model_config_from_hf
from nha_jax.convert.safetensors_io import SHARD_BYTES, TensorReader, write_tensors
from nha_jax.convert.weights import gate_from_k_proj, gate_name, tensor_table
from nha_jax.model import LanguageModel
from nha_jax.training.checkpoint import restore_params, save_params

MODEL_FILE, HF_CONFIG_FILE, HF_FILES_DIR, PARAMS_DIR = "nha_model.json", "hf_config.json", "hf_files", "params"
GATES_FILE = "nha_gates.safetensors"
# Non-weight files of a Hugging Face folder that travel through a conversion unchanged.
PASSTHROUGH_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "tokenizer.model", "vocab.json", "merges.txt")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def param_name(path) -> str:
    """A parameter's name from its pytree path: "blocks/0/attn/q_proj/kernel" (no Variable ".value" suffix)."""
    return jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")


def abstract_params(model_cfg: ml_collections.ConfigDict) -> nnx.State:
    """The model's nnx.State of ShapeDtypeStructs (no memory); builds the layers, so config errors surface here."""
    model = nnx.eval_shape(lambda: LanguageModel(model_cfg, seq_len=1, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def params_from_hf(hf_folder: str | Path, model_cfg: ml_collections.ConfigDict) -> nnx.State:
    """Reads a Hugging Face safetensors folder into an nnx.State of float32 numpy arrays for `model_cfg`.

    Gates: taken from the folder's nha_gates.safetensors when an earlier export left one, else initialised from
    k_proj rows. Raises MissingTensorError / ValueError naming the tensor that is missing or mis-shaped.
    """
    reader = TensorReader(hf_folder)
    table = {ours: (theirs, transposed) for ours, theirs, transposed in tensor_table(model_cfg)}
    gates_file = Path(hf_folder) / GATES_FILE
    saved_gates = load_file(gates_file) if gates_file.is_file() else {}

    def read(name: str, expected: tuple[int, ...]) -> np.ndarray:
        if name in table:
            theirs, transposed = table[name]
            array = reader.read(theirs)
            source = theirs
            array = array.T if transposed else array
        elif name in saved_gates:
            array, source = saved_gates[name], f"{GATES_FILE}:{name}"
        elif name.endswith("gate_proj/kernel"):
            layer = int(name.split("/")[1])
            k_kernel = reader.read(table[f"blocks/{layer}/attn/k_proj/kernel"][0]).T
            array, source = gate_from_k_proj(k_kernel, num_kv_heads=model_cfg.num_kv_heads,
                                             head_dim=model_cfg.head_dim, num_slots=model_cfg.num_slots), name
        else:
            raise ValueError(f"nha-jax parameter {name!r} has no Hugging Face counterpart; check the model config.")
        if array.shape != expected:
            raise ValueError(f"tensor {source!r} has shape {tuple(array.shape)} but the model config needs "
                             f"{expected} for {name!r}; the config.json and the weights disagree.")
        return np.ascontiguousarray(array.astype(np.float32))

    return jax.tree_util.tree_map_with_path(lambda path, leaf: read(param_name(path), leaf.shape),
                                            abstract_params(model_cfg))


def flat_params(params) -> dict[str, np.ndarray]:
    """name -> numpy array for a params tree (an nnx.State, or the nested dict orbax restores without a target;
    a leading "params/" of a whole train state is dropped)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {param_name(path).removeprefix("params/"): np.asarray(leaf) for path, leaf in flat}


def hf_tensors_from_params(params, model_cfg: ml_collections.ConfigDict, dtype: str
                           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(Hugging Face tensors in `dtype`, NHA gate tensors) from a params tree for `model_cfg`."""
    flat = flat_params(params)
    target = NUMPY_DTYPES[dtype]
    hf_tensors = {}
    for ours, theirs, transposed in tensor_table(model_cfg):
        if ours not in flat:
            raise ValueError(f"parameter {ours!r} is missing from the params; were they saved for this model config?")
        array = flat[ours].T if transposed else flat[ours]
        hf_tensors[theirs] = np.ascontiguousarray(array.astype(target))
    gates = {name: flat[name] for name in (gate_name(layer) for layer in range(model_cfg.num_layers)) if name in flat}
    return hf_tensors, gates


def import_checkpoint(hf_folder: str | Path, out_folder: str | Path, *, num_slots: int, window: int,
                      block_size: int, full_idx: int, compute_dtype: str = "bfloat16") -> ml_collections.ConfigDict:
    """Converts a Hugging Face folder into a converted folder (module docstring); returns the model config."""
    hf_folder, out_folder = Path(hf_folder), Path(out_folder)
    if not (hf_folder / "config.json").is_file():
        raise FileNotFoundError(f"{hf_folder}/config.json is missing; pass a Hugging Face model folder.")
    if out_folder.exists() and any(out_folder.iterdir()):
        raise FileExistsError(f"{out_folder} exists and is not empty; pass a new output folder.")
    hf_config = json.loads((hf_folder / "config.json").read_text())
    model_cfg = model_config_from_hf(hf_config, num_slots=num_slots, window=window, block_size=block_size,
                                     full_idx=full_idx, compute_dtype=compute_dtype)
    params = params_from_hf(hf_folder, model_cfg)
    out_folder.mkdir(parents=True, exist_ok=True)
    save_params(str(out_folder / PARAMS_DIR), params)
    (out_folder / MODEL_FILE).write_text(model_cfg.to_json(indent=2))
    shutil.copyfile(hf_folder / "config.json", out_folder / HF_CONFIG_FILE)
    (out_folder / HF_FILES_DIR).mkdir()
    for name in PASSTHROUGH_FILES:
        if (hf_folder / name).is_file():
            shutil.copyfile(hf_folder / name, out_folder / HF_FILES_DIR / name)
    return model_cfg


def load_model_config(converted_folder: str | Path) -> ml_collections.ConfigDict:
    """The model config a converted folder was written with."""
    return ml_collections.ConfigDict(json.loads((Path(converted_folder) / MODEL_FILE).read_text()))


def load_params(converted_folder: str | Path, params_dir: str | Path | None = None):
    """The converted folder's params, or those of `params_dir` (a save_params folder, or a trainer checkpoint's
    step folder <workdir>/checkpoints/<step>), as an nnx.State of jax arrays shaped for the folder's model config."""
    abstract = abstract_params(load_model_config(converted_folder))
    source = Path(params_dir) if params_dir else Path(converted_folder) / PARAMS_DIR
    if not (source / "state").is_dir():
        return restore_params(str(source), abstract)
    # A trainer step folder holds the whole train state; restore it untargeted and keep its params.
    with ocp.StandardCheckpointer() as checkpointer:
        flat = flat_params(checkpointer.restore((source / "state").absolute())["params"])
    return jax.tree_util.tree_map_with_path(lambda path, leaf: jnp.asarray(flat[param_name(path)]), abstract)


def export_checkpoint(converted_folder: str | Path, out_folder: str | Path, *, params_dir: str | Path | None = None,
                      dtype: str | None = None, shard_bytes: int = SHARD_BYTES) -> None:
    """Writes a folder that transformers loads: config.json, safetensors weights in `dtype` (default: the source
    checkpoint's), the source's tokenizer files, and for a hybrid the NHA gates (module docstring)."""
    converted_folder, out_folder = Path(converted_folder), Path(out_folder)
    hf_config = json.loads((converted_folder / HF_CONFIG_FILE).read_text())
    dtype = dtype or checkpoint_dtype(hf_config)
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for export; use one of {list(NUMPY_DTYPES)}.")
    if out_folder.exists() and any(out_folder.iterdir()):
        raise FileExistsError(f"{out_folder} exists and is not empty; pass a new output folder.")
    model_cfg = load_model_config(converted_folder)
    hf_tensors, gates = hf_tensors_from_params(load_params(converted_folder, params_dir), model_cfg, dtype)
    out_folder.mkdir(parents=True, exist_ok=True)
    write_tensors(out_folder, iter(hf_tensors.items()), sum(a.nbytes for a in hf_tensors.values()),
                  shard_bytes=shard_bytes)
    (out_folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    for file in (converted_folder / HF_FILES_DIR).iterdir():
        shutil.copyfile(file, out_folder / file.name)
    if gates:
        save_file(gates, str(out_folder / GATES_FILE))
        (out_folder / MODEL_FILE).write_text(model_cfg.to_json(indent=2))
