"""The trainer: config loading and checks, train state, jitted step, optimizer, checkpoints, metrics, the loop."""
from nha_jax.training.config import ConfigError, apply_overrides, load_config_file, validate
from nha_jax.training.loop import NonFiniteLossError, train

__all__ = ["ConfigError", "NonFiniteLossError", "apply_overrides", "load_config_file", "train", "validate"]
