"""Ragged paged attention in plain jnp: query blocks walk their sequence's pages with an online
softmax.

Algorithm. q is gathered into query blocks of ``block_q`` tokens, each within one sequence
(``ragged_blocks``): [NB, block_q, Hkv, groups, D] with NB = T // block_q + S. A ``fori_loop``
walks the page tables in chunks of ``pages_per_block`` pages, all blocks in lockstep, as far as
the block that needs the most keys; each step gathers every block's chunk of K and V pages from
its sequence's page-table row ([NB, pages_per_block * page_size, Hkv, D], int8 pages dequantized
after the gather), scores it against the block's tokens x the query heads of each KV head, masks
keys past each query's position (causal, bottom-right aligned; this also hides keys past the
sequence's length) and, with a left window, keys before position - window (the chunks before
every block's window are skipped), zeroes the V rows of keys no real query of the block sees
(they may hold anything, NaN included) and folds it into a float32 running max, sum and
accumulator. Outputs are gathered back to token order; padding tokens get out 0, lse -inf.

Memory touched: q and the output twice (gathered to and from the block layout), the visited pages
once per query block (not once per token, as one decode per token would) and one chunk of
gathered K/V plus its score tile [NB, Hq, block_q, chunk] at a time: linear in the context,
never T x context. GQA views q as [.., Hkv, groups, D], so K/V are never repeated. No VJP.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kernels_pallas.attention import tiling
from kernels_pallas.attention.ragged_blocks import (RaggedLayout, blocks_from_tokens,
                                                    tokens_from_blocks)
from kernels_pallas.attention.tiling import MASK_VALUE


def ragged_paged_attention(q, k_pages, v_pages, page_table, layout: RaggedLayout, *,
                           scale: float, block_q: int, pages_per_block: int, k_scales=None,
                           v_scales=None, local_window: int | None = None):
    """q [T, Hq, D]; pages [num_pages, page_size, Hkv, D] (int8 with float32 scales [num_pages,
    page_size, Hkv]); page_table int32 [S, P]; ``layout`` built with this block_q; local_window
    None or the keys before its position a query sees
    -> (out [T, Hq, D] in q.dtype, lse float32 [T, Hq])."""
    t, hq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    groups = hq // hkv
    nb = layout.num_blocks
    chunk = pages_per_block * page_size
    # Padding entries point at page 0 (a valid index); their keys lie past every query.
    table = tiling.pad_to(page_table, 1, tiling.cdiv(page_table.shape[1], pages_per_block)
                          * pages_per_block)[layout.block_seq]  # [NB, P'] each block's row
    qb = blocks_from_tokens(q, layout, block_q).reshape(nb, block_q, hkv, groups, d)
    positions = layout.block_pos0[:, None] + jnp.arange(block_q, dtype=jnp.int32)  # [NB, block_q]
    key_limit = layout.key_limit()[:, None]  # [NB, 1] keys the block's last real query sees

    def body(j, carry):
        ids = lax.dynamic_slice_in_dim(table, j * pages_per_block, pages_per_block, 1)
        k, v = tiling.gather_kv(k_pages, v_pages, k_scales, v_scales, ids, q.dtype,
                                (nb, chunk, hkv, d))  # [NB, chunk, Hkv, D]
        s = jnp.einsum("nqhgd,nkhd->nhgqk", qb, k, preferred_element_type=jnp.float32) * scale
        keys = j * chunk + jnp.arange(chunk, dtype=jnp.int32)  # [chunk]
        mask = keys[None, None, :] <= positions[:, :, None]  # [NB, block_q, chunk]
        if local_window is not None:
            mask &= keys[None, None, :] >= positions[:, :, None] - local_window
        mask = mask[:, None, None]  # [NB, 1, 1, block_q, chunk]
        s = jnp.where(mask, s, MASK_VALUE)  # [NB, Hkv, groups, block_q, chunk]
        # V rows no real query of the block sees may hold anything (NaN included): zero them
        seen = keys[None, :] < key_limit  # [NB, chunk]
        if local_window is not None:  # nor the keys before its first query's window
            seen &= keys[None, :] >= layout.block_pos0[:, None] - local_window
        v_valid = seen[:, :, None, None]  # [NB, chunk, 1, 1]
        return tiling.online_softmax_step(*carry, s, mask, v, "nhgqk,nkhd->nhgqd", v_valid)

    stat_shape = (nb, hkv, groups, block_q)
    init = (jnp.zeros((*stat_shape, d), jnp.float32), jnp.full(stat_shape, -jnp.inf),
            jnp.zeros(stat_shape, jnp.float32))
    # Walk only as far as the block needing the most keys (a dynamic trip count).
    steps = (jnp.max(layout.key_limit()) + chunk - 1) // chunk
    first = 0
    if local_window is not None:  # chunks before every block's window are skipped
        lowest = jnp.where(layout.block_count > 0, layout.block_pos0 - local_window,
                           jnp.max(layout.key_limit()))  # [NB] the first key a block sees
        first = jnp.maximum(jnp.min(lowest), 0) // chunk
    out, lse = tiling.finish_online_softmax(*lax.fori_loop(first, steps, body, init))
    out = out.transpose(0, 3, 1, 2, 4).reshape(nb * block_q, hq, d)  # token-major rows
    lse = lse.transpose(0, 3, 1, 2).reshape(nb * block_q, hq)
    return (tokens_from_blocks(out, layout, 0.0).astype(q.dtype),
            tokens_from_blocks(lse, layout, -jnp.inf))
