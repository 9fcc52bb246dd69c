"""Device mesh and logical axis names.

Parameters and activations are annotated with *logical* axis names ("embed", "heads", "batch", ...); this module
maps them onto the three mesh axes ("data", "fsdp", "tensor"). Changing the parallelism layout is a change of the
rules below or of the mesh sizes in the config, never of the model code.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",  # flattened (head x head_dim) columns of q/k/v/gate/o projections
    "mlp": "tensor",
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_vocab": "tensor",
}


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, device_count: int) -> tuple[int, int, int]:
    """Fills the one axis given as -1 so that data * fsdp * tensor == device_count.

    Raises ValueError naming the `mesh.*` config key when the sizes cannot multiply to the device count.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size}: each mesh axis size must be a positive integer or -1 (= fill).")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh.{fill[0]} and mesh.{fill[1]} are both -1: at most one mesh axis may be -1 (= fill).")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if device_count % fixed:
            raise ValueError(
                f"mesh.{fill[0]}=-1 cannot fill {device_count} devices: the other axes multiply to {fixed}, "
                f"which does not divide {device_count}. Set the mesh.* sizes so that they divide the device count.")
        sizes[fill[0]] = device_count // fixed
    elif fixed != device_count:
        raise ValueError(
            f"mesh.data * mesh.fsdp * mesh.tensor = {data}*{fsdp}*{tensor} = {fixed}, but there are {device_count} "
            "devices. Set one of them to -1 to fill, or make the product equal the device count.")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over all (or the given) devices with axes ("data", "fsdp", "tensor"); one size may be -1 (= fill)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_to_mesh_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    """("embed", "heads") -> PartitionSpec("fsdp", "tensor") under LOGICAL_AXIS_RULES."""
    mesh_axes = []
    for name in logical_axes:
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise ValueError(f"Unknown logical axis {name!r}; add it to nha_jax.sharding.LOGICAL_AXIS_RULES.")
        mesh_axes.append(None if name is None else LOGICAL_AXIS_RULES[name])
    return PartitionSpec(*mesh_axes)


def tree_shardings(logical_specs, mesh: Mesh):
    """Maps a tree of logical PartitionSpecs (e.g. from nnx.get_partition_spec) to NamedShardings on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_mesh_spec(spec)), logical_specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context (single-device runs, tests)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(logical_axes))
