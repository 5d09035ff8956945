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


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, sequence: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes MESH_AXES of the given sizes over `devices` (default: all devices of all
    processes). The sizes must multiply to the number of devices."""
    sizes = dict(data=data, fsdp=fsdp, expert=expert, sequence=sequence, tensor=tensor)
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"mesh axis size {name} must be an integer >= 1; got {size!r}")
    given = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must not repeat a device; got {len(devices)} entries for "
                         f"{len(set(devices))} distinct devices")
    shape = tuple(int(sizes[a]) for a in MESH_AXES)
    needed = math.prod(shape)
    if needed != len(devices):
        product = " * ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
        source = "devices" if given else "jax.devices()"
        fix = (f"change the sizes or pass devices={source}[:{needed}]"
               if needed < len(devices) else
               f"the mesh needs more than the {len(devices)} devices "
               f"{'given' if given else 'that exist'}; change the sizes")
        raise ValueError(
            f"mesh axis sizes must multiply to the number of devices used: {product} = "
            f"{needed}, but there are {len(devices)} devices; {fix}")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=devices)


def check_auto_mesh(mesh: Mesh) -> None:
    """Parameters and constraints here assume Auto axes (GSPMD); under Explicit axes jax types
    carry shardings and sharded matmuls need out_sharding arguments the models do not give."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    explicit = [name for name, t in zip(mesh.axis_names, mesh.axis_types)
                if t == jax.sharding.AxisType.Explicit]
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
