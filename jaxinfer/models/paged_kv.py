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


class PagedBatch(NamedTuple):
    """Per-token metadata of one flat batch of T token slots (padding slots included)."""

    positions: jax.Array  # int32 [T]: position of each token in its own sequence
    write_slots: jax.Array  # int32 [T]: flat K/V slot page*page_size+offset; out of range = skip
    page_rows: jax.Array  # int32 [T, pages_per_seq]: the page table of each token's sequence
    lengths: jax.Array  # int32 [T]: keys each token attends to (position + 1; 0 for padding)


@struct.dataclass
class PagedLayerKV:
    k: jax.Array  # [num_pages, page_size, kv_heads, head_dim]
    v: jax.Array  # [num_pages, page_size, kv_heads, head_dim]

    def write(self, k_new: jax.Array, v_new: jax.Array, slots: jax.Array) -> "PagedLayerKV":
        """Store k_new, v_new [T, kv_heads, head_dim] at flat slots int32 [T]; slots outside the
        pool (padding tokens) are dropped."""
        num_pages, page_size, hkv, d = self.k.shape

        def put(pages: jax.Array, new: jax.Array) -> jax.Array:
            flat = pages.reshape(num_pages * page_size, hkv, d)
            flat = flat.at[slots].set(new.astype(pages.dtype), mode="drop")
            return flat.reshape(num_pages, page_size, hkv, d)

        return PagedLayerKV(put(self.k, k_new), put(self.v, v_new))


@struct.dataclass
class PagedKVCache:
    layers: tuple[PagedLayerKV, ...]

    @classmethod
    def zeros(cls, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
              dtype: jnp.dtype) -> "PagedKVCache":
        shape = (num_pages, page_size, kv_heads, head_dim)
        return cls(tuple(PagedLayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                         for _ in range(num_layers)))

    @property
    def num_pages(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def page_size(self) -> int:
        return self.layers[0].k.shape[1]


def page_bytes(num_layers: int, page_size: int, kv_heads: int, head_dim: int,
               dtype: jnp.dtype) -> int:
    """Device bytes of one page across all layers, K and V."""
    return 2 * num_layers * page_size * kv_heads * head_dim * jnp.dtype(dtype).itemsize
