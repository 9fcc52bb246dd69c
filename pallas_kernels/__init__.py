"""Fused NHA kernels: one module per backend, each with one differentiable entry point of the same contract
(kernel, launcher and custom_vjp side by side). Nothing here imports nha_jax; nha_jax.ops dispatches to it.

    nha_attention_<backend>(q, k, v, log_alpha, segment_ids, positions, slot_k0=None, slot_v0=None, *,
                            window, scale, rope_theta, return_slots=False, interpret=False)
"""
import importlib

from jax.ad_checkpoint import checkpoint_name

# The name every kernel's forward gives to what its backward keeps from the kernels (output, softmax statistics,
# chunk states): a remat policy that saves it (nha_jax.model's "dots_and_attention") keeps the forward kernels from
# running again in the backward pass.
RESIDUALS_NAME = "nha_attention_residuals"


def name_residuals(*arrays):
    """The arrays, each tagged RESIDUALS_NAME for jax.checkpoint policies (an identity otherwise)."""
    return tuple(checkpoint_name(x, RESIDUALS_NAME) for x in arrays)

# impl name -> (module, entry point, the platform its kernels compile for; every backend also interprets on CPU)
KERNELS = {
    "pallas_triton": ("pallas_kernels.triton", "nha_attention_triton", "gpu"),
    "pallas_mosaic_gpu": ("pallas_kernels.mosaic_gpu", "nha_attention_mosaic_gpu", "gpu"),
    "pallas_tpu": ("pallas_kernels.tpu", "nha_attention_tpu", "tpu"),
}


def get_kernel(impl):
    """Returns (entry point, platform) for an impl name of KERNELS; ValueError if that backend is not built."""
    module_name, function, platform = KERNELS[impl]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise ValueError(f"impl={impl!r} is not built in this version of nha-jax; use impl='auto'.") from None
    return getattr(module, function), platform
