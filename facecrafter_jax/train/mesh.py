"""Device mesh and sharding rules: the ONE place where training decides how arrays are laid out.

Mesh: two axes ``("data", "fsdp")`` over all devices of all processes (``jax.devices()`` order, so the
devices of one process are contiguous and ``fsdp`` groups stay inside a host when ``fsdp`` divides the
local device count). Axis types are ``Auto`` (classic GSPMD propagation; ``jax.make_mesh`` would make
them ``Explicit``).

Logical axes, then rules (maxdiffusion style)::

    batch dimension of every input          -> "batch"  -> ("data", "fsdp")   (all devices)
    largest dim of a big parameter-like array -> "shard" -> "fsdp"
    everything else                          -> None    -> replicated

"Parameter-like" arrays are the frozen base weights, the trainable adapter weights and every array of
the optimiser / EMA state that has the same shape as a parameter (Adam moments). A parameter is "big"
when it has at least ``min_shard_size`` elements; its sharded dimension is the largest one divisible by
the ``fsdp`` size (ties: the last). Arrays with no such dimension are replicated. Since the rule only
looks at shapes, the optimiser moments get exactly their parameter's sharding.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import MeshConfig

__all__ = ["AXES", "LOGICAL_RULES", "make_mesh", "resolve_mesh_shape", "logical_axes", "logical_to_spec",
           "array_sharding", "tree_shardings", "batch_sharding", "replicated"]

AXES = ("data", "fsdp")
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "shard": "fsdp",
}
"""Logical axis name -> mesh axis (or axes). Change layouts here and nowhere else."""


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int]:
    """``(data, fsdp)`` with a -1 entry resolved; the product must equal ``num_devices``."""
    data, fsdp = int(cfg.data), int(cfg.fsdp)
    for name, v in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if v == 0 or v < -1:
            raise ValueError(f"{name} must be a positive size or -1, got {v}")
    if data == -1 and fsdp == -1:
        raise ValueError("only one of mesh.data, mesh.fsdp may be -1")
    if data == -1:
        if num_devices % fsdp:
            raise ValueError(f"mesh.fsdp={fsdp} does not divide the {num_devices} devices")
        data = num_devices // fsdp
    elif fsdp == -1:
        if num_devices % data:
            raise ValueError(f"mesh.data={data} does not divide the {num_devices} devices")
        fsdp = num_devices // data
    if data * fsdp != num_devices:
        raise ValueError(f"mesh data x fsdp = {data} x {fsdp} = {data * fsdp} does not match the {num_devices} devices")
    return data, fsdp


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """The ``(data, fsdp)`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = resolve_mesh_shape(cfg, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return jax.sharding.Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def logical_axes(shape: tuple[int, ...], fsdp_size: int, min_shard_size: int) -> tuple[str | None, ...]:
    """Logical axis names of a parameter-like array of ``shape`` (see the module docstring)."""
    shape = tuple(int(s) for s in shape)
    axes: list[str | None] = [None] * len(shape)
    if fsdp_size <= 1 or not shape or math.prod(shape) < min_shard_size:
        return tuple(axes)
    best = None
    for i, s in enumerate(shape):
        if s % fsdp_size == 0 and (best is None or s >= shape[best]):
            best = i
    if best is not None:
        axes[best] = "shard"
    return tuple(axes)


def logical_to_spec(axes: tuple[str | None, ...]) -> P:
    """PartitionSpec of logical axes through :data:`LOGICAL_RULES`."""
    out = []
    for a in axes:
        if a is None:
            out.append(None)
        elif a in LOGICAL_RULES:
            out.append(LOGICAL_RULES[a])
        else:
            raise ValueError(f"no sharding rule for logical axis {a!r}; known: {sorted(LOGICAL_RULES)}")
    return P(*out)


def array_sharding(mesh: jax.sharding.Mesh, shape, min_shard_size: int) -> NamedSharding:
    """Sharding of one parameter-like array."""
    return NamedSharding(mesh, logical_to_spec(logical_axes(tuple(shape), mesh.shape["fsdp"], min_shard_size)))


def tree_shardings(mesh: jax.sharding.Mesh, tree: Any, min_shard_size: int) -> Any:
    """A sharding for every array leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``s) by the shape rule."""
    return jax.tree.map(lambda x: array_sharding(mesh, np.shape(x), min_shard_size), tree)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Inputs: the batch (leading) dimension split over every device, ``P(("data", "fsdp"))``."""
    return NamedSharding(mesh, logical_to_spec(("batch",)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
