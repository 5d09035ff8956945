"""The token exchange of expert parallelism: each device's capacity buffer [E, C, D] goes to the
devices that own the experts and the experts' outputs come back, over one mesh axis of size P.

Two implementations with the same result:

- "padded": `all_to_all` of the whole buffer, [E, C, D] -> [E/P, P*C, D]. Every slot travels,
  filled or not, so the bytes are those of a full buffer whatever the routing.
- "ragged": `jax.lax.ragged_all_to_all`, which sends only the filled slots of each expert (slots
  fill from 0, so expert e's kept choices are the first `send_counts[e]` rows of its block) and
  writes them where the padded exchange would have put them, into a zero-initialised buffer of
  the same shape. The received buffer is therefore identical to the padded one, the expert
  computation is unchanged, and only the bytes on the wire shrink (by the buffer's fill ratio,
  1 / capacity_factor when nothing drops). The per-device counts cost one extra `all_to_all` of
  E int32.

XLA:CPU does not implement `ragged-all-to-all` (jax 0.10: "not supported by XLA:CPU
ThunkEmitter"), so `exchange="auto"` picks "ragged" on GPU and TPU and "padded" on CPU. On CPU the
ragged path still lowers to StableHLO, and `ragged_exchange_layout` (the offsets and sizes, the
part that can go wrong) is a pure function tested against the padded exchange there.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

EXCHANGES = ("auto", "padded", "ragged")
RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")  # where XLA implements ragged-all-to-all


def resolve_exchange(exchange: str, mesh: Mesh) -> str:
    """"padded" or "ragged" for `exchange` in EXCHANGES: "auto" picks by the mesh's platform."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}; got {exchange!r}")
    if exchange != "auto":
        return exchange
    platform = mesh.devices.flat[0].platform
    return "ragged" if platform in RAGGED_PLATFORMS else "padded"


class RaggedLayout(NamedTuple):
    """The index arguments of one `ragged_all_to_all`, each int32 [E]: entry i is the slice sent
    to peer i // (E / P) (see jax.lax.ragged_all_to_all)."""

    input_offsets: jax.Array
    send_sizes: jax.Array
    output_offsets: jax.Array
    recv_sizes: jax.Array


def ragged_exchange_layout(send_counts: jax.Array, recv_counts: jax.Array, shard: jax.Array | int,
                           num_shards: int, capacity: int) -> tuple[RaggedLayout, RaggedLayout]:
    """Offsets and sizes of the dispatch and the combine exchange on device `shard` of P.

    send_counts int32 [E]: this device's kept token-choices per global expert (the first
    send_counts[e] slots of expert e's block in its [E, C] buffer). recv_counts int32 [E]: entry
    s * (E/P) + j is what device s sends to this device's local expert j, i.e.
    `all_to_all(send_counts, tiled=True)`. Buffers, flattened over their leading axes:
    the send buffer [E, C] (row e * C + c) and the expert-side buffer [E/P, P, C] (row
    (j * P + s) * C + c, the layout of the padded exchange's [E/P, P*C] output).

    Returns (dispatch, combine): dispatch sends send-buffer blocks to the expert side; combine
    sends the same rows back, so its sizes are dispatch's with send and receive swapped."""
    num_experts = send_counts.shape[0]
    local = num_experts // num_shards  # E / P experts per device
    slice_ids = jnp.arange(num_experts, dtype=jnp.int32)  # [E]
    peer, local_expert = slice_ids // local, slice_ids % local  # slice i goes to / comes from peer
    shard = jnp.asarray(shard, jnp.int32)
    send_counts = send_counts.astype(jnp.int32)
    recv_counts = recv_counts.astype(jnp.int32)
    # dispatch: slice i = global expert i, to its owner peer; lands in that peer's row block
    # (local_expert * P + shard) * C
    dispatch = RaggedLayout(input_offsets=slice_ids * capacity, send_sizes=send_counts,
                            output_offsets=(local_expert * num_shards + shard) * capacity,
                            recv_sizes=recv_counts)
    # combine: slice i = local expert (i % local)'s rows from peer i // local, sent back to that
    # peer's block of global expert shard * local + local_expert
    combine = RaggedLayout(input_offsets=(local_expert * num_shards + peer) * capacity,
                           send_sizes=recv_counts,
                           output_offsets=(shard * local + local_expert) * capacity,
                           recv_sizes=send_counts)
    return dispatch, combine


def _ragged(rows: jax.Array, out_rows: int, layout: RaggedLayout, axis: str) -> jax.Array:
    """ragged_all_to_all of rows [N, D] into a zero buffer [out_rows, D]."""
    output = jnp.zeros((out_rows, rows.shape[-1]), rows.dtype)
    return jax.lax.ragged_all_to_all(rows, output, *layout, axis_name=axis)


def to_experts(xs: jax.Array, send_counts: jax.Array, *, axis: str, num_shards: int,
               exchange: str) -> tuple[jax.Array, tuple[RaggedLayout, RaggedLayout] | None]:
    """Inside a shard_map over `axis`: xs [E, C, D] (this device's capacity buffer; send_counts
    int32 [E] its filled slots per expert) -> ([E/P, P*C, D] on each expert owner, the layouts
    `from_experts` needs, None for "padded"). `exchange` is "padded" or "ragged" (see
    `resolve_exchange`)."""
    if exchange not in ("padded", "ragged"):
        raise ValueError(f"exchange must be 'padded' or 'ragged' here (resolve 'auto' with "
                         f"resolve_exchange first); got {exchange!r}")
    if exchange == "padded":
        return jax.lax.all_to_all(xs, axis, split_axis=0, concat_axis=1, tiled=True), None
    e, c, d = xs.shape
    recv_counts = jax.lax.all_to_all(send_counts, axis, 0, 0, tiled=True)  # [E]
    layouts = ragged_exchange_layout(send_counts, recv_counts, jax.lax.axis_index(axis),
                                     num_shards, c)
    received = _ragged(xs.reshape(e * c, d), e * c, layouts[0], axis)  # [E/P * P * C, D]
    return received.reshape(e // num_shards, num_shards * c, d), layouts


def from_experts(ys: jax.Array, layouts: tuple[RaggedLayout, RaggedLayout] | None, *, axis: str,
                 num_shards: int) -> jax.Array:
    """The inverse of `to_experts`: ys [E/P, P*C, D] -> [E, C, D] back on the tokens' devices
    (slots that were empty on the way out come back as 0 on the ragged path)."""
    if layouts is None:
        return jax.lax.all_to_all(ys, axis, split_axis=1, concat_axis=0, tiled=True)
    local, pc, d = ys.shape
    c = pc // num_shards
    returned = _ragged(ys.reshape(local * pc, d), local * pc, layouts[1], axis)  # [E * C, D]
    return returned.reshape(local * num_shards, c, d)
