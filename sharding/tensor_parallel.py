"""Megatron tensor parallelism with sequence-parallel norms (the "tp_sp" layout) as explicit
collectives: `column_parallel_matmul`, `row_parallel_matmul` and `vocab_parallel_lookup` (the
embedding, whose per-vocab-shard rows are reduce-scattered onto the residual like a row-parallel
output).

Under tp_sp the residual stream [batch, seq, embed] is split along the sequence over the tensor
axis ("res_seq" -> "tensor"), while the column-parallel weights (q/k/v, gate/up: output features
over "tensor") need every token, and the row-parallel ones (o, down: input features over
"tensor") produce per-device partial sums over all tokens. Megatron-SP joins them with

    residual [b, T/P, D] --all-gather(seq)--> [b, T, D] @ W_col [D, N/P] -> [b, T, N/P]
    [b, T, K/P] @ W_row [K/P, D] = partial [b, T, D] --reduce-scatter(seq)--> residual [b, T/P, D]

which moves the bytes of one all-reduce per block but keeps the norms' activations split P ways.
Left to sharding constraints alone, XLA:CPU's partitioner wrote each row-parallel output as an
all-reduce followed by a dynamic-slice, and each column-parallel input gradient likewise (the audit
of issue "sharding": 0 reduce-scatters). Here both run inside one `shard_map` over the tensor
axis: `psum_scatter` after the row-parallel product, `all_gather` before the column-parallel ones;
autodiff transposes them into the backward's all-gather and reduce-scatter.

Models never name the axis: they pass the logical names of their arrays, and the active rules
(`sharding.use_rules`) say whether the layout is tp_sp-like. Where it is not (no rules, plain tp,
a length the axis does not divide, a decode step of one token) both functions are the plain
matmul and the partitioner does what the constraints ask, as before.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from sharding.constraints import active_rules
from sharding.mesh import axis_size
from sharding.rules import logical_to_mesh_axes, spec_entry
from sharding.sp_common import shard_map

Axes = Sequence["str | None"]


@dataclasses.dataclass(frozen=True)
class SequenceParallelPlan:
    """How one matmul runs under Megatron-SP: over mesh axis `axis` (P devices), the batch split
    over `batch` (a PartitionSpec entry, None: replicated)."""
    mesh: Mesh
    axis: str
    size: int
    batch: "str | tuple[str, ...] | None"


def _axes_of(name: str | None, table: dict) -> tuple[str, ...]:
    (axes,) = logical_to_mesh_axes((name,), table)
    return axes


def _check_3d(x: jax.Array, x_axes: Axes, what: str) -> None:
    if x.ndim != 3 or len(x_axes) != 3:
        raise ValueError(f"{what}: x must be [batch, seq, features] with three logical axes; got "
                         f"shape {tuple(x.shape)} and axes {tuple(x_axes)}")


def _check_weight(x: jax.Array, w: jax.Array, w_axes: Axes, what: str) -> None:
    if w.ndim != 2 or len(w_axes) != 2:
        raise ValueError(f"{what}: weight must be [in, out] with two logical axes; got shape "
                         f"{tuple(w.shape)} and axes {tuple(w_axes)}")
    if w.shape[0] != x.shape[-1]:
        raise ValueError(f"{what}: x's features ({x.shape[-1]}) must equal the weight's input "
                         f"dimension; got x {tuple(x.shape)} and weight {tuple(w.shape)}")


def _plan(batch: int, seq: int, batch_name: str | None, split_seq_name: str | None,
          unsplit_seq_name: str | None, feature_names: Sequence[str | None],
          feature_sizes: Sequence[int], *, replicated_ok: bool = False
          ) -> SequenceParallelPlan | None:
    """The plan when the active rules split `split_seq_name` over exactly one mesh axis of P > 1
    devices, leave `unsplit_seq_name` whole, split every one of `feature_names` over that same
    axis (or, with `replicated_ok`, leave some of them whole, though not all), and P divides seq
    and every split feature size; None otherwise (the plain matmul)."""
    active = active_rules()
    if active is None:
        return None
    table, mesh = active.table, active.mesh
    seq_axes = _axes_of(split_seq_name, table)
    if len(seq_axes) != 1 or _axes_of(unsplit_seq_name, table):
        return None
    (axis,) = seq_axes
    size = axis_size(mesh, axis)
    if size == 1 or seq % size:
        return None
    split = 0
    for name, features in zip(feature_names, feature_sizes):
        feature_axes = _axes_of(name, table)
        if feature_axes == seq_axes and features % size == 0:
            split += 1
        elif feature_axes or not replicated_ok:
            return None
    if split == 0:
        return None
    batch_axes = tuple(a for a in _axes_of(batch_name, table) if a != axis)
    if batch_axes and batch % axis_size(mesh, batch_axes):
        batch_axes = ()  # as `constrain` does: a batch the axes do not divide stays whole
    return SequenceParallelPlan(mesh, axis, size, spec_entry(batch_axes))


def row_parallel_matmul(x: jax.Array, w: jax.Array, *, x_axes: Axes, w_axes: Axes,
                        out_axes: Axes) -> jax.Array:
    """x @ w for a row-parallel weight: x [batch, seq, K] (logical axes `x_axes`, K split like
    w's input dimension), w [K, N] (logical axes `w_axes`) -> [batch, seq, N] in the layout of
    `out_axes` (the residual stream's names).

    Where the active rules split the output's sequence over the mesh axis that splits K (and
    leave x's sequence whole), each device multiplies its K/P slice and the partial products are
    reduce-scattered along the sequence (`psum_scatter`): the result is already the
    sequence-split residual. Otherwise it is `jnp.dot(x, w)` (the caller's constraints decide
    the layout; plain tp's all-reduce comes from the partitioner)."""
    _check_3d(x, x_axes, "row_parallel_matmul")
    _check_weight(x, w, w_axes, "row_parallel_matmul")
    if len(out_axes) != 3:
        raise ValueError(f"row_parallel_matmul: out_axes must name three dimensions; got "
                         f"{tuple(out_axes)}")
    batch, seq, k = x.shape
    plan = _plan(batch, seq, x_axes[0], out_axes[1], x_axes[1], (x_axes[2], w_axes[0]), (k, k))
    if plan is None:
        return jnp.dot(x, w)

    def body(x_local: jax.Array, w_local: jax.Array) -> jax.Array:
        # [b, T, K/P] @ [K/P, N] -> partial [b, T, N] -> summed over the axis, [b, T/P, N]
        partial = jnp.dot(x_local, w_local)
        return jax.lax.psum_scatter(partial, plan.axis, scatter_dimension=1, tiled=True)

    return shard_map(body, mesh=plan.mesh,
                     in_specs=(PartitionSpec(plan.batch, None, plan.axis),
                               PartitionSpec(plan.axis, None)),
                     out_specs=PartitionSpec(plan.batch, plan.axis, None))(x, w)


def column_parallel_matmul(x: jax.Array, ws: Sequence[jax.Array], *, x_axes: Axes,
                           w_axes: Sequence[Axes], out_seq: str | None = "seq"
                           ) -> list[jax.Array]:
    """[x @ w for w in ws] for column-parallel weights sharing one input: x [batch, seq, K]
    (logical axes `x_axes`, the residual stream's), each w [K, N_i] (logical axes `w_axes[i]`,
    N_i split over the tensor axis) -> [batch, seq, N_i] each, its features split like w's and
    its sequence named `out_seq`.

    Where the active rules split x's sequence over the mesh axis that splits the N_i (and leave
    `out_seq` whole), x is all-gathered along the sequence once and each device multiplies the
    whole sequence by its N_i/P columns; the backward reduce-scatters x's gradient. A weight the
    rules replicate (KV heads that the axis does not divide) is applied whole on every device
    to the gathered x, rather than projected per sequence slice and gathered again. Otherwise it
    is one `jnp.dot` per weight."""
    ws = list(ws)
    _check_3d(x, x_axes, "column_parallel_matmul")
    if len(w_axes) != len(ws) or not ws:
        raise ValueError(f"column_parallel_matmul: need one axes tuple per weight (at least one); "
                         f"got {len(ws)} weights and {len(w_axes)} axes tuples")
    for w, axes in zip(ws, w_axes):
        _check_weight(x, w, axes, "column_parallel_matmul")
    batch, seq, _ = x.shape
    plan = _plan(batch, seq, x_axes[0], x_axes[1], out_seq, [a[1] for a in w_axes],
                 [w.shape[1] for w in ws], replicated_ok=True)
    if plan is None:
        return [jnp.dot(x, w) for w in ws]
    table = active_rules().table
    split = [bool(_axes_of(axes[1], table)) for axes in w_axes]  # else replicated

    def body(x_local: jax.Array, *w_local: jax.Array) -> tuple[jax.Array, ...]:
        # [b, T/P, K] -> [b, T, K], then [b, T, K] @ [K, N_i/P] -> [b, T, N_i/P] each
        x_full = jax.lax.all_gather(x_local, plan.axis, axis=1, tiled=True)
        return tuple(jnp.dot(x_full, w) for w in w_local)

    features = [plan.axis if s else None for s in split]
    return list(shard_map(body, mesh=plan.mesh,
                          in_specs=(PartitionSpec(plan.batch, plan.axis, None),
                                    *[PartitionSpec(None, f) for f in features]),
                          out_specs=tuple(PartitionSpec(plan.batch, None, f)
                                          for f in features))(x, *ws))


def vocab_parallel_lookup(table: jax.Array, ids: jax.Array, *, table_axes: Axes,
                          ids_axes: Axes, out_axes: Axes) -> jax.Array | None:
    """Megatron-SP's embedding: table [vocab, D] (logical axes `table_axes`) looked up at ids int
    [batch, seq] (logical axes `ids_axes`) -> [batch, seq, D] in the layout of `out_axes` (the
    residual's), where the active rules split the vocabulary and the output's sequence over one
    mesh axis of P devices (tp_sp) and leave the ids' sequence whole; None otherwise, and the
    caller looks up as it would without this.

    Each device looks every id up in its own vocab shard (zero rows for ids it does not hold;
    NaN rows for ids outside the vocabulary, like the unsharded lookup) and the partial rows are
    reduce-scattered along the sequence: the whole table never moves and no device holds the
    full [batch, seq, D] sum, where the partitioner all-reduced it and kept a slice."""
    if table.ndim != 2 or len(table_axes) != 2:
        raise ValueError(f"vocab_parallel_lookup: table must be [vocab, embed] with two logical "
                         f"axes; got shape {tuple(table.shape)} and axes {tuple(table_axes)}")
    if ids.ndim != 2 or len(ids_axes) != 2 or len(out_axes) != 3:
        raise ValueError(f"vocab_parallel_lookup: ids must be [batch, seq] with two logical axes "
                         f"and out_axes name three; got ids {tuple(ids.shape)}, ids_axes "
                         f"{tuple(ids_axes)}, out_axes {tuple(out_axes)}")
    batch, seq = ids.shape
    vocab = table.shape[0]
    plan = _plan(batch, seq, ids_axes[0], out_axes[1], ids_axes[1], (table_axes[0],), (vocab,))
    if plan is None:
        return None

    def body(table_local: jax.Array, ids: jax.Array) -> jax.Array:
        rows = table_local.shape[0]  # V/P: this device's ids are [first, first + rows)
        ids = jnp.where(ids < 0, ids + vocab, ids)  # negative ids count from the end (jnp.take)
        local = ids - jax.lax.axis_index(plan.axis) * rows  # [b, T]
        mine = (local >= 0) & (local < rows)
        found = jnp.take(table_local, jnp.where(mine, local, 0), axis=0)  # [b, T, D]
        found = jnp.where(mine[..., None], found, jnp.zeros((), table_local.dtype))
        # an id outside the vocabulary is a NaN row, as jnp.take's fill gives every other layout
        unknown = ((ids < 0) | (ids >= vocab))[..., None]
        found = jnp.where(unknown, jnp.full((), jnp.nan, table_local.dtype), found)
        return jax.lax.psum_scatter(found, plan.axis, scatter_dimension=1, tiled=True)

    return shard_map(body, mesh=plan.mesh,
                     in_specs=(PartitionSpec(plan.axis, None), PartitionSpec(plan.batch, None)),
                     out_specs=PartitionSpec(plan.batch, plan.axis, None))(table, ids)
