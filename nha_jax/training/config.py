"""Loading a config file, applying `--config.key=value` overrides, and checking the values before anything runs.

Every problem is a ConfigError whose message names the key and the fix; train.py turns it into exit code 2.
"""
from __future__ import annotations

import ast
import json
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

import ml_collections

from nha_jax.model import COMPUTE_DTYPES, REMAT_POLICIES, layer_windows
from nha_jax.ops import IMPLS
from nha_jax.sharding import resolve_mesh_shape

RUN_CONFIG_FILE = "config.json"  # written into every workdir by the trainer


class ConfigError(ValueError):
    """A config file, override or value the trainer cannot run with."""


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports `path` and returns its get_config()."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config={path}: no such file; pass a config such as configs/default.py.")
    # Config files import their shared pieces as `configs.common`: make the folder above theirs importable.
    package_root = str(file.resolve().parent.parent)
    if package_root not in sys.path:
        sys.path.insert(0, package_root)
    spec = importlib.util.spec_from_file_location(f"nha_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config={path}: the file defines no get_config(); it must return a ConfigDict.")
    return module.get_config()


def _parse_value(key: str, text: str, current):
    """Parses an override string into the type of the value it replaces."""
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected true or false.")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--config.{key}={text}: expected a {type(current).__name__} literal.") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(current)(value)
    if not isinstance(value, type(current)):
        raise ConfigError(f"--config.{key}={text}: expected a {type(current).__name__}, got {type(value).__name__}.")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies overrides like "model.d_model=512" (a leading "--config." is accepted and stripped)."""
    for override in overrides:
        item = override.removeprefix("--").removeprefix("config.")
        if "=" not in item:
            raise ConfigError(f"{override!r}: overrides look like --config.key=value.")
        key, text = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for depth, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(f"--config.{key}: unknown key {'.'.join(parents[:depth + 1])!r}; "
                                  "see the config file for the available keys.")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(f"--config.{key}: unknown key {key!r}; see the config file for the available keys.")
        current = node[leaf]
        try:
            node[leaf] = text if current is None else _parse_value(key, text, current)
        except (TypeError, ValueError, KeyError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"--config.{key}={text}: {error}") from None
    return config


def _require(condition: bool, key: str, message: str):
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks values and their combinations; raises ConfigError naming the key and the fix."""
    for key in ("seq_len", "global_batch_size", "grad_accum_steps", "total_steps", "log_every", "keep_checkpoints"):
        _require(config[key] >= 1, key, f"must be >= 1, got {config[key]}.")
    for key in ("eval_every", "eval_batches", "diagnostic_every", "diagnostic_tokens", "checkpoint_every"):
        _require(config[key] >= 0, key, f"must be >= 0, got {config[key]}.")
    _require(config.global_batch_size % config.grad_accum_steps == 0, "grad_accum_steps",
             f"must divide global_batch_size={config.global_batch_size}, got {config.grad_accum_steps}.")

    model = config.model
    for key in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "v_head_dim"):
        _require(model[key] >= 1, f"model.{key}", f"must be >= 1, got {model[key]}.")
    for key in ("num_slots", "window", "block_size", "mlp_hidden", "vocab_size"):
        _require(model[key] >= 0, f"model.{key}", f"must be >= 0, got {model[key]}.")
    _require(model.num_heads % model.num_kv_heads == 0, "model.num_kv_heads",
             f"must divide model.num_heads={model.num_heads}, got {model.num_kv_heads}.")
    _require(model.head_dim % 2 == 0, "model.head_dim", f"RoPE needs an even head dim, got {model.head_dim}.")
    _require(model.gate_temperature > 0, "model.gate_temperature", f"must be > 0, got {model.gate_temperature}.")
    _require(model.block_size == 0 or 0 <= model.full_idx < model.block_size, "model.full_idx",
             f"must be in [0, model.block_size={model.block_size}), got {model.full_idx}.")
    _require(model.attention_impl in IMPLS, "model.attention_impl", f"must be one of {IMPLS}.")
    _require(model.chunk_size >= 1, "model.chunk_size", f"must be >= 1, got {model.chunk_size}.")
    _require(model.compute_dtype in COMPUTE_DTYPES, "model.compute_dtype", f"must be one of {list(COMPUTE_DTYPES)}.")
    _require(model.remat in REMAT_POLICIES, "model.remat", f"must be one of {list(REMAT_POLICIES)}.")
    try:
        windows = layer_windows(model, config.seq_len)
    except ValueError as error:
        raise ConfigError(f"config.{error}") from None
    _require(model.num_slots > 0 or min(windows) > 0, "model.windows",
             "a layer with window 0 and model.num_slots=0 attends to nothing; give it a window or slots.")

    init_params = config.get("init_params")
    _require(not init_params or Path(init_params).is_dir(), "init_params",
             f"{init_params!r} is no directory; write one with `python -m nha_jax.convert import`, or set it to ''.")

    opt = config.optimizer
    _require(opt.peak_lr > 0, "optimizer.peak_lr", f"must be > 0, got {opt.peak_lr}.")
    _require(opt.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0, got {opt.warmup_steps}.")
    _require(0 <= opt.end_lr_ratio <= 1, "optimizer.end_lr_ratio", f"must be in [0, 1], got {opt.end_lr_ratio}.")
    for key in ("b1", "b2"):
        _require(0 <= opt[key] < 1, f"optimizer.{key}", f"must be in [0, 1), got {opt[key]}.")
    _require(opt.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {opt.weight_decay}.")
    _require(opt.clip_norm > 0, "optimizer.clip_norm", f"must be > 0, got {opt.clip_norm}.")


def validate_for_devices(config: ml_collections.ConfigDict, device_count: int, process_count: int
                         ) -> tuple[int, int, int]:
    """Checks the mesh and batch against the devices at hand; returns the (data, fsdp, tensor) mesh shape."""
    try:
        shape = resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, device_count)
    except ValueError as error:
        raise ConfigError(f"config.{error}") from None
    batch_shards = shape[0] * shape[1]
    micro_batch = config.global_batch_size // config.grad_accum_steps
    _require(micro_batch % batch_shards == 0, "global_batch_size",
             f"global_batch_size / grad_accum_steps = {micro_batch} rows must divide over mesh.data * mesh.fsdp = "
             f"{batch_shards} devices; change the batch, grad_accum_steps or the mesh.")
    _require(config.global_batch_size % process_count == 0, "global_batch_size",
             f"must divide over {process_count} hosts, got {config.global_batch_size}.")
    return shape


def save_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes <workdir>/config.json: the run's resolved config, which generation and eval read back."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / RUN_CONFIG_FILE).write_text(config.to_json(indent=2))


def run_config(workdir: str, config_path: str | None = None, overrides: Sequence[str] = ()
               ) -> ml_collections.ConfigDict:
    """The config a workdir was trained with: config_path plus overrides when given, else <workdir>/config.json."""
    saved = Path(workdir) / RUN_CONFIG_FILE
    if config_path:
        config = load_config_file(config_path)
    elif saved.is_file():
        config = ml_collections.ConfigDict(json.loads(saved.read_text()))
    else:
        raise ValueError(f"--workdir={workdir} has no {RUN_CONFIG_FILE}; pass --config with the file (and overrides) "
                         "the run was trained with.")
    return apply_overrides(config, overrides)
