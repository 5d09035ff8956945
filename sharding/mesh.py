"""`make_mesh`: one device mesh with the five named parallelism axes.

Axis order is ("data", "fsdp", "expert", "sequence", "tensor"): jax's device-mesh builder gives the
trailing axes the most local devices, so tensor parallelism (a collective per matmul) lands on the
fastest links and data parallelism (one all-reduce per step) on the slowest.

Every axis is `AxisType.Auto`: parameters and activations are placed by `NamedSharding` and
`with_sharding_constraint`, and XLA's partitioner propagates the rest. (jax >= 0.9's
`jax.make_mesh` defaults to Explicit axes, under which shard_map and sharding-in-types behave
differently; see ../shared/research/parallelism.md.)
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")


def _auto_axis_types(n: int):
    axis_type = getattr(jax.sharding, "AxisType", None)
    return None if axis_type is None else (axis_type.Auto,) * n


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, sequence: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes MESH_AXES of the given sizes over `devices` (default: all devices of all
    processes). The sizes must multiply to the number of devices."""
    sizes = dict(data=data, fsdp=fsdp, expert=expert, sequence=sequence, tensor=tensor)
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"mesh axis size {name} must be an integer >= 1; got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(int(sizes[a]) for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        product = " * ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
        raise ValueError(
            f"mesh axis sizes must multiply to the number of devices used: {product} = "
            f"{math.prod(shape)}, but there are {len(devices)} devices; change the sizes or pass "
            f"devices=jax.devices()[:{math.prod(shape)}]")
    axis_types = _auto_axis_types(len(MESH_AXES))
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except TypeError:  # a jax without axis_types / devices keywords on make_mesh
        from jax.experimental import mesh_utils
        return Mesh(mesh_utils.create_device_mesh(shape, devices=devices), MESH_AXES)


def check_auto_mesh(mesh: Mesh) -> None:
    """Parameters and constraints here assume Auto axes (GSPMD); under Explicit axes jax types
    carry shardings and sharded matmuls need out_sharding arguments the models do not give."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    axis_type = getattr(jax.sharding, "AxisType", None)
    explicit = [name for name, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ()) or ())
                if axis_type is not None and t == axis_type.Explicit]
    if explicit:
        raise ValueError(
            f"mesh axes {tuple(explicit)} are Explicit (jax.make_mesh's default since jax 0.9); "
            f"build the mesh with sharding.make_mesh, or pass "
            f"axis_types=(jax.sharding.AxisType.Auto,) * n to jax.make_mesh")


def axis_size(mesh: Mesh, axes: str | Sequence[str] | None, *, name: str = "axes") -> int:
    """Number of shards a dimension assigned to `axes` (one mesh axis, several, or None) has; a
    ValueError naming the argument (`name`) and the mesh's axes when one is not in the mesh."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    for a in axes:
        if a not in mesh.axis_names:
            raise ValueError(f"{name}={a!r} is not an axis of the mesh; its axes are "
                             f"{tuple(mesh.axis_names)}")
    return math.prod(int(mesh.shape[a]) for a in axes)
