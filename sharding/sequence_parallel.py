"""`sequence_parallel_attention`: the one call a model makes for attention over a sequence that is
sharded across a mesh axis; `impl` picks ring attention or Ulysses (see those modules), and
`communication_elements` gives what each moves, for choosing between them.

Choosing (../shared/research/parallelism.md): Ulysses moves b N d (2H + 2Hkv)(P-1)/P^2 elements
per device per layer in the forward, shrinking with P; the ring moves 2 b N Hkv d (P-1)/P,
constant in P, but overlaps it with compute and has no head-count limit. Ulysses for P <= kv
heads on a fast switch; the ring beyond the head count or when GQA makes K/V small.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh

from sharding.ring_attention import ring_attention
from sharding.ulysses import kv_head_repeats, ulysses_attention

IMPLS = ("ring", "ulysses")


def sequence_parallel_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh,
                                impl: str = "ring", causal: bool = False,
                                axis: str = "sequence", layout: str = "contiguous",
                                segment_ids: jax.Array | None = None,
                                local_window: int | tuple[int, int] | None = None,
                                softmax_scale: float | None = None,
                                backend: str = "auto",
                                batch_axes: str | Sequence[str] | None = None) -> jax.Array:
    """Attention of q [batch, seq, heads, head_dim] against k, v [batch, seq, kv_heads, head_dim]
    whose seq dimension is split over mesh axis `axis`; returns [batch, seq, heads, head_dim] with
    the same sharding.

    layout: the order of the sequence over the devices, the same default for both impls:
    "contiguous" (natural order, device i holding the i-th slice) or "zigzag" (opt-in, permute
    the tokens with `sharding.zigzag_permute` first: under a causal mask it balances the ring's
    work, device i holding chunks i and 2P-1-i of 2P). Both impls accept both layouts, so one
    input pipeline can serve either; the output is in the input's layout.

    local_window (sliding-window attention) is Ulysses only: a ring block's window would need
    global offsets that flash_attention's masks do not take. Other arguments as in
    `ring_attention`.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if local_window is not None and impl == "ring":
        raise ValueError(f"local_window={local_window!r} is not supported by impl='ring'; use "
                         f"impl='ulysses' for sliding-window attention")
    kwargs = dict(mesh=mesh, axis=axis, causal=causal, layout=layout, segment_ids=segment_ids,
                  softmax_scale=softmax_scale, backend=backend, batch_axes=batch_axes)
    if impl == "ring":
        return ring_attention(q, k, v, **kwargs)
    return ulysses_attention(q, k, v, local_window=local_window, **kwargs)


def communication_elements(impl: str, *, batch: int, seq: int, heads: int, kv_heads: int,
                           head_dim: int, num_shards: int, backward: bool = False) -> int:
    """Elements each device sends for one attention call (forward, or forward + backward).

    ring: P-1 hops of its K and V shard forward; the backward replays them and also sends the
      dK, dV accumulators P hops (they return home), so 2 (P-1) + 2 (P-1) + 2 P shard-sized sends.
    ulysses: all-to-all of q, k, v and out, keeping 1/P of each local shard; the backward's
      transposed all-to-alls move dO, dq, dk and dv, the same again (KV heads counted after the
      replication that kv_heads < P needs)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    p = num_shards
    shard = batch * (seq // p) * head_dim  # elements of one head of one local shard
    if impl == "ring":
        kv_hops = 2 * (p - 1) * shard * kv_heads
        if not backward:
            return kv_hops
        return kv_hops + 2 * (p - 1) * shard * kv_heads + 2 * p * shard * kv_heads
    kv = kv_heads * kv_head_repeats(heads, kv_heads, p)
    forward = (2 * heads + 2 * kv) * shard * (p - 1) // p
    return 2 * forward if backward else forward
