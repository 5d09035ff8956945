"""Paged decode attention in plain jnp: online softmax over chunks of pages.

Algorithm. One query token per sequence. A ``while`` loop walks the page table in chunks of
``pages_per_block`` pages, as far as the longest sequence needs, from the first chunk any
sequence's window reaches; each step gathers the chunk's K and
V pages of every sequence ([batch, pages_per_block * page_size, Hkv, D]), scores them against the
query heads of each KV head group, masks positions >= length, and with a left window
positions < length - 1 - window (zeroing their V rows: slots past a length may hold anything, NaN
included) and folds the chunk into a float32 running max, sum and accumulator.
Rows whose length is 0 see nothing: out 0, lse -inf.

Memory touched: the query, the visited pages and one chunk of gathered K/V plus its score tile; the
whole gathered context is never materialized. GQA views q as [batch, Hkv, groups, D], so K/V are
never repeated. Decode only: no VJP.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kernels_pallas.attention import tiling
from kernels_pallas.attention.tiling import MASK_VALUE

DEFAULT_CHUNK_TOKENS = 512  # tokens gathered per loop step: large enough to amortize the loop


def default_pages_per_block(page_size: int, pages_per_seq: int,
                            tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
    """Pages per loop step of the XLA paged paths: about ``tokens`` context tokens (at least one
    page, at most the table's width). The ragged path passes its own, smaller chunk."""
    return max(1, min(pages_per_seq, tokens // page_size))


def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, scale: float,
                           pages_per_block: int, k_scales=None, v_scales=None,
                           local_window: int | None = None):
    """q [batch, Hq, D]; pages [num_pages, page_size, Hkv, D] (int8 with scales [num_pages,
    page_size, Hkv], dequantized chunk by chunk); page_table int32 [batch, pages_per_seq];
    lengths int32 [batch]; local_window None or the keys before the query it sees
    -> (out [batch, Hq, D] in q.dtype, lse float32 [batch, Hq])."""
    batch, hq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    groups = hq // hkv
    chunk = pages_per_block * page_size
    n_chunks = tiling.cdiv(page_table.shape[1], pages_per_block)
    # Padding entries point at page 0 (a valid index); their positions are past every length.
    table = tiling.pad_to(page_table, 1, n_chunks * pages_per_block)
    qg = q.reshape(batch, hkv, groups, d)  # [batch, Hkv, groups, D]
    stat_shape = (batch, hkv, groups)

    def body(j, carry):
        acc, m, l = carry
        ids = lax.dynamic_slice_in_dim(table, j * pages_per_block, pages_per_block, 1)
        k, v = tiling.gather_kv(k_pages, v_pages, k_scales, v_scales, ids, q.dtype,
                                (batch, chunk, hkv, d))  # [batch, chunk, Hkv, D]
        s = jnp.einsum("bhgd,bkhd->bhgk", qg, k, preferred_element_type=jnp.float32) * scale
        pos = j * chunk + jnp.arange(chunk, dtype=jnp.int32)  # [chunk]
        valid = pos[None, :] < lengths[:, None]  # [batch, chunk]
        if local_window is not None:
            valid &= pos[None, :] >= lengths[:, None] - 1 - local_window
        mask = valid[:, None, None, :]  # [batch, 1, 1, chunk]
        s = jnp.where(mask, s, MASK_VALUE)
        return tiling.online_softmax_step(acc, m, l, s, mask, v, "bhgk,bkhd->bhgd",
                                          v_valid=valid[:, :, None, None])

    init = (jnp.zeros((*stat_shape, d), jnp.float32), jnp.full(stat_shape, -jnp.inf),
            jnp.zeros(stat_shape, jnp.float32))
    # Walk only as far as the longest sequence needs (a dynamic trip count, so a while loop).
    needed = (jnp.max(lengths).astype(jnp.int32) + chunk - 1) // chunk
    first = 0
    if local_window is not None:  # chunks before every sequence's window are skipped
        lowest = jnp.where(lengths > 0, lengths - 1 - local_window, jnp.max(lengths))  # [batch]
        first = jnp.maximum(jnp.min(lowest), 0) // chunk
    out, lse = tiling.finish_online_softmax(*lax.fori_loop(first, needed, body, init))
    return out.reshape(batch, hq, d).astype(q.dtype), lse.reshape(batch, hq)
