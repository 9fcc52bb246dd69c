"""Hugging Face Llama / Qwen2 checkpoints into NHA hybrids and back.

See docs/CONVERT.md; the CLI is `python -m nha_jax.convert`.
"""
from nha_jax.convert.architecture import UnsupportedArchitectureError, model_config_from_hf
from nha_jax.convert.converter import (export_checkpoint, hf_tensors_from_params, import_checkpoint, load_model_config,
                                       load_params, params_from_hf)
from nha_jax.convert.safetensors_io import MissingTensorError

__all__ = ["MissingTensorError", "UnsupportedArchitectureError", "export_checkpoint", "hf_tensors_from_params",
           "import_checkpoint", "load_model_config", "load_params", "model_config_from_hf", "params_from_hf"]
