"""Plumbing shared by the sequence-parallel attentions (ring, Ulysses): `shard_map` without the
replication check, and validation of q, k, v and the mesh at the public boundary
(inside the shard_map a shape error would name per-device shapes)."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from kernels_pallas.attention.checks import check_segment_ids
from sharding.mesh import axis_size as mesh_axis_size
from sharding.mesh import check_auto_mesh

LAYOUTS = ("contiguous", "zigzag")


def shard_map(f: Callable, *, mesh: Mesh, in_specs, out_specs) -> Callable:
    """`jax.shard_map` with the replication check off (for every shard_map of this package): the
    ring's custom VJP carries per-device residuals it cannot type, and Pallas kernels' outputs
    carry no varying-axes type."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def axis_size(mesh: Mesh, axis: str, *, name: str = "axis") -> int:
    """Size of the one mesh axis `axis` (`sharding.axis_size`'s check and message) of an Auto
    mesh: the entry check of ring and Ulysses attention, which refuses Explicit axes as
    `sharding.shard` and `use_rules` do (shard_map would otherwise blame its in_specs)."""
    if not isinstance(axis, str):
        raise TypeError(f"{name} must be a mesh axis name (a str); got {axis!r}")
    size = mesh_axis_size(mesh, axis, name=name)
    check_auto_mesh(mesh)
    return size


def check_batch_axes(mesh: Mesh, axis: str, batch_axes, batch: int) -> None:
    """batch_axes: None, a mesh axis name or a sequence of them, other than the sequence `axis`,
    none twice, whose sizes multiply to a divisor of the batch."""
    if batch_axes is None:
        return
    names = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    if not isinstance(names, (tuple, list)) or not all(isinstance(a, str) for a in names):
        raise TypeError(f"batch_axes must be None, a mesh axis name or a tuple of them; got "
                        f"{batch_axes!r}")
    size = mesh_axis_size(mesh, names, name="batch_axes")
    if axis in names:
        raise ValueError(f"batch_axes may not include axis {axis!r}, which splits the sequence; "
                         f"got batch_axes={batch_axes!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"batch_axes must name each mesh axis once; got {batch_axes!r}")
    if batch % size:
        raise ValueError(f"batch={batch} must be divisible by batch_axes {tuple(names)} of size "
                         f"{size}")


def check_qkv(q, k, v, segment_ids, *, num_shards: int, layout: str, causal: bool,
              windowed: bool = False) -> None:
    """q [batch, seq, heads, head_dim], k and v [batch, seq, kv_heads, head_dim], segment_ids
    None or an integer array [batch, seq]; the sequence splits into num_shards (2 * num_shards
    chunks for the zig-zag layout under a causal or windowed mask, which needs the natural order
    back)."""
    # A bool or numpy's (as fftconv takes them); a truthy "no" must not mean True.
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool; got {causal!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim]; got shape "
                             f"{getattr(x, 'shape', None)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {list(k.shape)} and v "
                         f"{list(v.shape)}")
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError(f"q and k must share batch, seq and head_dim (self-attention over one "
                         f"sharded sequence); got q {list(q.shape)} and k {list(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads must be a multiple of KV heads; got {q.shape[2]} query "
                         f"and {k.shape[2]} KV heads")
    seq = q.shape[1]
    chunks = 2 * num_shards if ((causal or windowed) and layout == "zigzag") else num_shards
    if seq % chunks:
        what = (f"2 * {num_shards} chunks (zig-zag layout)" if chunks != num_shards
                else f"{num_shards} shards")
        raise ValueError(f"the sequence length must split into {what}; got seq={seq}, which "
                         f"{chunks} does not divide")
    if segment_ids is not None:
        if hasattr(segment_ids, "shape") and tuple(segment_ids.shape) != tuple(q.shape[:2]):
            raise ValueError(f"segment_ids must be [batch, seq] = {list(q.shape[:2])}; got "
                             f"{list(segment_ids.shape)}")
        # flash_attention's own check (an integer array): shard_over_sequence casts the ids to
        # int32, which would truncate float ids and merge documents 1.2 and 1.7
        check_segment_ids(segment_ids, q.shape[0], seq, seq)


def activation_specs(axis: str, batch_axes: str | Sequence[str] | None
                     ) -> tuple[PartitionSpec, PartitionSpec]:
    """PartitionSpecs of [batch, seq, heads, head_dim] activations and [batch, seq] ids: the
    sequence split over `axis`, the batch over `batch_axes` (None: replicated)."""
    batch = tuple(batch_axes) if isinstance(batch_axes, (list, tuple)) else batch_axes
    return PartitionSpec(batch, axis, None, None), PartitionSpec(batch, axis)


def shard_over_sequence(body, q, k, v, segment_ids, *, mesh, axis: str, batch_axes):
    """Run ``body(q, k, v[, segment_ids])`` on each device's sequence shard (a `shard_map` over
    ``axis``, the batch split over ``batch_axes``); the output keeps q's sharding."""
    act, ids = activation_specs(axis, batch_axes)
    if segment_ids is None:
        return shard_map(lambda q, k, v: body(q, k, v), mesh=mesh, in_specs=(act, act, act),
                         out_specs=act)(q, k, v)
    return shard_map(lambda q, k, v, s: body(q, k, v, s), mesh=mesh,
                     in_specs=(act, act, act, ids), out_specs=act)(
                         q, k, v, jnp.asarray(segment_ids, jnp.int32))
