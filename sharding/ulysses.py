"""DeepSpeed-Ulysses: sequence parallelism by trading the sequence split for a head split.

Each of the P devices on `axis` holds [batch, N/P, heads, head_dim] of q, k and v. One
`lax.all_to_all` per tensor (split heads, concatenate sequence) leaves every device the whole
sequence for heads/P of the heads, [batch, N, heads/P, head_dim]; it runs an ordinary local
`kernels_pallas.flash_attention` (any mask works, there is no causal skew), and one more
all-to-all returns the output to [batch, N/P, heads, head_dim]. Autodiff transposes each
all-to-all into the inverse one, so the backward needs no custom rule.

Heads must divide over the devices. Query heads: `heads % P == 0`, else a ValueError. KV heads
(GQA): with `kv_heads % P == 0` device p gets KV heads p*kv_heads/P.. , exactly the ones its query
heads use. With fewer KV heads than devices (`P % kv_heads == 0`) each KV head is replicated
P/kv_heads times before the exchange, so that every device receives the one KV head its query
heads need; this costs P/kv_heads times the K/V traffic (logged), and the ring moves less then.
Any other count is a ValueError that says so.

Layouts: with "contiguous" the gathered sequence is in natural order; with "zigzag" (shared with
ring attention, so one input pipeline serves both) a causal mask needs the natural order back,
so the gathered sequence is un-permuted locally before the attention and re-permuted after.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from kernels_pallas import flash_attention
from sharding import sp_common
from sharding.zigzag import zigzag_permute, zigzag_unpermute

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class UlyssesConfig:
    axis_name: str
    axis_size: int
    causal: bool
    layout: str
    scale: float | None
    backend: str
    kv_repeats: int  # KV heads replicated this many times when kv_heads < P
    local_window: object  # as flash_attention's local_window (None: no window)


def kv_head_repeats(heads: int, kv_heads: int, num_shards: int, *, windowed: bool = False
                    ) -> int:
    """How many times each KV head is replicated so heads split over `num_shards` devices
    (1: none needed); a ValueError explaining the constraint when no replication helps. windowed:
    the attention has a sliding window, which the ring cannot take, so the advice is a smaller
    sequence axis rather than the ring."""
    advice = ("Sliding-window attention runs sequence-parallel only through Ulysses (a ring block "
              "cannot carry a window), so the heads must meet the condition above: use a "
              "sequence axis that meets it"
              if windowed else
              "Use ring attention (impl='ring'), whose degree is not bounded by the head count, "
              "or a smaller axis")
    if heads % num_shards:
        raise ValueError(
            f"Ulysses splits attention heads over the {num_shards} devices of the sequence axis, "
            f"so heads must be divisible by {num_shards}; got heads={heads}. {advice}")
    if kv_heads % num_shards == 0:
        return 1
    if num_shards % kv_heads == 0:
        return num_shards // kv_heads
    raise ValueError(
        f"Ulysses needs kv_heads divisible by the {num_shards} devices of the sequence axis, or "
        f"{num_shards} divisible by kv_heads (then KV heads are replicated); got "
        f"kv_heads={kv_heads}. {advice}")


def ulysses_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh,
                      axis: str = "sequence", causal: bool = False, layout: str = "contiguous",
                      segment_ids: jax.Array | None = None,
                      local_window: int | tuple[int, int] | None = None,
                      softmax_scale: float | None = None, backend: str = "auto",
                      batch_axes: str | Sequence[str] | None = None) -> jax.Array:
    """Ulysses attention of q against k, v whose sequence dimension is sharded over `axis`.

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; heads divisible
        by P = mesh.shape[axis]; kv_heads divisible by P, or dividing P (replicated, see above).
      layout: "contiguous" (seq % P == 0) or "zigzag" (the ring's balanced layout; seq % 2P == 0
        when causal or windowed): the order the sequence is in, as for `ring_attention`.
      causal, segment_ids ([batch, seq], same layout), local_window, softmax_scale, backend: as
        in `kernels_pallas.flash_attention`, applied to the gathered sequence.
      batch_axes: mesh axes the batch is split over (default: replicated).

    Returns:
      out [batch, seq, heads, head_dim] in q's dtype, in the layout and sharding of q.
    """
    size = sp_common.axis_size(mesh, axis)
    windowed = local_window is not None
    sp_common.check_qkv(q, k, v, segment_ids, num_shards=size, layout=layout, causal=causal,
                        windowed=windowed)
    sp_common.check_batch_axes(mesh, axis, batch_axes, q.shape[0])
    repeats = kv_head_repeats(q.shape[2], k.shape[2], size, windowed=windowed)
    if repeats > 1:
        logger.info("ulysses: %d KV heads over %d devices; replicating each KV head %d times",
                    k.shape[2], size, repeats)
    cfg = UlyssesConfig(axis, size, bool(causal), layout,
                        None if softmax_scale is None else float(softmax_scale), backend, repeats,
                        local_window)
    return sp_common.shard_over_sequence(functools.partial(ulysses_attention_shard, cfg=cfg),
                                         q, k, v, segment_ids, mesh=mesh, axis=axis,
                                         batch_axes=batch_axes)


def ulysses_attention_shard(q: jax.Array, k: jax.Array, v: jax.Array,
                            segment_ids: jax.Array | None = None, *, cfg: UlyssesConfig
                            ) -> jax.Array:
    """The per-device body, for callers already inside a `shard_map` over `cfg.axis_name`.

    q [batch, n, heads, head_dim], k, v [batch, n, kv_heads, head_dim], segment_ids int
    [batch, n] or None (n = seq / P) -> out [batch, n, heads, head_dim]."""
    if cfg.kv_repeats > 1:
        k = jnp.repeat(k, cfg.kv_repeats, axis=2)  # [batch, n, P, head_dim]
        v = jnp.repeat(v, cfg.kv_repeats, axis=2)

    def to_heads(x):  # [batch, n, h, d] -> [batch, seq, h / P, d]
        return lax.all_to_all(x, cfg.axis_name, split_axis=2, concat_axis=1, tiled=True)

    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    if segment_ids is not None:
        segment_ids = lax.all_gather(segment_ids, cfg.axis_name, axis=1, tiled=True)  # [b, seq]
    reorder = (cfg.causal or cfg.local_window is not None) and cfg.layout == "zigzag"
    if reorder:  # causal and window masks need natural order; other masks ignore the key order
        q, k, v = (zigzag_unpermute(x, cfg.axis_size) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = zigzag_unpermute(segment_ids, cfg.axis_size)
    out = flash_attention(q, k, v, causal=cfg.causal, segment_ids=segment_ids,
                          local_window=cfg.local_window, softmax_scale=cfg.scale,
                          backend=cfg.backend)  # [b, seq, h / P, d]
    if reorder:
        out = zigzag_permute(out, cfg.axis_size)
    # [batch, seq, h / P, d] -> [batch, n, h, d]
    return lax.all_to_all(out, cfg.axis_name, split_axis=1, concat_axis=2, tiled=True)
