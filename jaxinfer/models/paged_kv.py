"""The paged KV cache that the serving engine's model pass reads and writes.

K and V of every layer live in a pool of fixed-size pages, [num_pages, page_size, kv_heads,
head_dim] (vLLM's layout, the one `kernels_pallas.paged_decode_attention` reads). Which pages hold
which sequence is host-side bookkeeping (the engine's page tables); on the device a forward pass
only sees, per token, a flat slot `page * page_size + offset` to write its K/V at, and a page-table
row plus a length to attend over.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.models.kv_quant import quantize_kv


class SharedPrefix(NamedTuple):
    """Leading pages that several sequences of a batch share (prefix caching hands out the same
    pages), attended Hydragen-style: all member tokens against the prefix in one dense attention,
    then each over the rest of its own pages, merged by log-sum-exp."""

    pages: jax.Array  # int32 [prefix_pages]: the prefix's pages (padding entries any valid page)
    length: jax.Array  # int32 []: prefix tokens, a multiple of page_size
    member: jax.Array  # bool [T]: tokens of sequences that start with the prefix (and lie past it)
    # (a sequence of a PagedBatch is a member iff its first token is)


@struct.dataclass
class PagedBatch:
    """One flat batch of T token slots (padding included) from up to S sequences.

    Each sequence's tokens are contiguous and in position order (a serving step's chunks), so the
    batch is described per sequence, as `kernels_pallas.ragged_paged_attention` takes it: sequence
    s owns tokens query_starts[s] : query_starts[s + 1] and attends over its first kv_lengths[s]
    cached keys, its own tokens' included (causal, bottom-right aligned). `ragged` picks how:
    True reads each sequence's pages once per query block (ragged_paged_attention), False runs
    one decode per token over its sequence's pages (paged_decode_attention); see
    `jaxinfer.generate.engine_step` for when each is faster."""

    positions: jax.Array  # int32 [T]: position of each token in its own sequence (RoPE)
    write_slots: jax.Array  # int32 [T]: flat K/V slot page*page_size+offset; out of range = skip
    page_table: jax.Array  # int32 [S, pages_per_seq]: each sequence's pages
    query_starts: jax.Array  # int32 [S + 1]: where each sequence's tokens start (padding after)
    kv_lengths: jax.Array  # int32 [S]: keys each sequence's last token attends to (its cache
    # slot + 1: position + 1 unless SnapKV compressed the sequence's prompt)
    num_seqs: jax.Array  # int32 []: real sequences, the first num_seqs of the S
    shared: SharedPrefix | None = None  # a prefix shared by some of the sequences, if any
    ragged: bool = struct.field(pytree_node=False, default=True)


@struct.dataclass
class PagedLayerKV:
    """One layer's pages: float K/V, or int8 values with a float32 scale per (token, KV head)
    (`kv_quant.quantize_kv`; about half the bytes of bfloat16: 0.53x at head_dim 64, 0.52x at
    128)."""

    k: jax.Array  # [num_pages, page_size, kv_heads, head_dim]
    v: jax.Array  # [num_pages, page_size, kv_heads, head_dim]
    k_scale: jax.Array | None = None  # float32 [num_pages, page_size, kv_heads] for int8 pages
    v_scale: jax.Array | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def write(self, k_new: jax.Array, v_new: jax.Array, slots: jax.Array) -> "PagedLayerKV":
        """Store k_new, v_new [T, kv_heads, head_dim] at flat slots int32 [T] (quantized first
        for int8 pages); slots outside the pool (padding tokens) are dropped."""
        num_pages, page_size = self.k.shape[:2]

        def put(pages: jax.Array, new: jax.Array) -> jax.Array:
            flat = pages.reshape(num_pages * page_size, *pages.shape[2:])
            flat = flat.at[slots].set(new.astype(pages.dtype), mode="drop")
            return flat.reshape(pages.shape)

        if not self.quantized:
            return PagedLayerKV(put(self.k, k_new), put(self.v, v_new))
        (k8, ks), (v8, vs) = quantize_kv(k_new), quantize_kv(v_new)
        return PagedLayerKV(put(self.k, k8), put(self.v, v8), put(self.k_scale, ks),
                            put(self.v_scale, vs))


@struct.dataclass
class PagedKVCache:
    layers: tuple[PagedLayerKV, ...]

    @classmethod
    def zeros(cls, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
              dtype: jnp.dtype) -> "PagedKVCache":
        """An empty pool; dtype int8 gives quantized pages with float32 scales."""
        shape = (num_pages, page_size, kv_heads, head_dim)
        quantized = jnp.dtype(dtype) == jnp.int8
        scales = lambda: [jnp.zeros(shape[:3], jnp.float32) for _ in range(2 * quantized)]
        return cls(tuple(PagedLayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), *scales())
                         for _ in range(num_layers)))

    @property
    def num_pages(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def page_size(self) -> int:
        return self.layers[0].k.shape[1]


def page_bytes(num_layers: int, page_size: int, kv_heads: int, head_dim: int,
               dtype: jnp.dtype) -> int:
    """Device bytes of one page across all layers, K and V (int8: values plus float32 scales)."""
    per_vector = head_dim * jnp.dtype(dtype).itemsize + (4 if jnp.dtype(dtype) == jnp.int8 else 0)
    return 2 * num_layers * page_size * kv_heads * per_vector
