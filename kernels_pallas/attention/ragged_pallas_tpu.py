"""Ragged paged attention (prefill chunks and decodes in one launch) as a Pallas kernel for TPUs
(Mosaic lowering; ``interpret=True`` on CPU). After vLLM's TPU "ragged paged attention".

Algorithm. The step's sequences are cut into query blocks of ``block_q`` tokens that never
straddle a sequence (``ragged_blocks``, the layout the xla and GPU paths share); there are
NB = T // block_q + S of them, the real ones first. XLA gathers q into that block order and
derives, per block, its page-table row, its causal limit (keys its last token sees: pos0 + count,
0 for an empty block) and each token's own limit (pos0 + t + 1: causal by position, bottom-right
aligned, so a chunk may start mid-context; 0 for rows past the block's count). The Mosaic kernel
is the decode kernel's (``paged_pallas_tpu.attend_query_blocks``; a decode is a block of one
token), run with a key limit per query row:

- grid (NB, KV head lane blocks, page steps), the page-step axis sequential ("arbitrary"), a
  float32 online softmax in VMEM scratch across it;
- scalar prefetch into SMEM of the blocks' causal limits and their page-table rows (flattened), so
  each step's BlockSpecs fetch the block's *physical* pages (``pages_per_block`` of them, one
  BlockSpec per page);
- the matmul rows are the block's tokens x the query heads of the KV heads in the lane block
  (block-diagonal over the lane block's heads when D < 128), so a sequence's pages are read once
  per query block and KV head block, not once per token;
- steps wholly past the block's causal limit skip their compute (``pl.when``) and their index
  maps repeat the last needed step's pages (``paged_pallas_tpu.table_column``), so nothing is
  fetched twice; keys past a row's own limit are masked;
- the last step writes out = acc / l and lse = m + log l; rows that see nothing (padding rows of
  a block, empty blocks) get out 0 and lse -inf;
- with a left window w, keys before a row's limit - 1 - w are masked as well, and a block's walk
  starts at the page holding its first token's window start, the grid having the steps of the
  pages its w + block_q keys can straddle (``tiling.span_pages``), not of the whole row: the pages
  wholly before every token's window are neither fetched nor scored.

The block's page-table rows (``page_table[block_seq]``, [NB, pages_per_seq]) are what SMEM holds;
past ``paged_pallas_tpu.MAX_TABLE_ENTRIES`` the blocks run in chunks under ``lax.map``. Empty
blocks read page 0 (their sequence's entries may be padding) and still take their grid steps.

Memory touched: q and the output twice (gathered to and from the block layout by XLA, padding
each sequence to whole blocks: S * block_q rows at most), each block's visited pages once per KV
head lane block (int8 pages dequantized in the kernel, so HBM traffic is the int8 pages), and the
per-row limits. No VJP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.attention import paged_pallas_tpu
from kernels_pallas.attention.ragged_blocks import (RaggedLayout, blocks_from_tokens,
                                                    tokens_from_blocks)


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           page_table: jax.Array, layout: RaggedLayout, *, scale: float,
                           block_q: int, pages_per_block: int | None, interpret: bool,
                           k_scales: jax.Array | None = None,
                           v_scales: jax.Array | None = None,
                           local_window: int | None = None) -> tuple[jax.Array, jax.Array]:
    """q [T, Hq, D]; pages [num_pages, page_size, Hkv, D] (any page_size; int8 with float32
    scales [num_pages, page_size, Hkv]); page_table int32 [S, P]; ``layout`` built with
    ``block_q``; local_window None or the keys before its position a query sees
    -> (out [T, Hq, D] in q.dtype, lse float32 [T, Hq]).

    ``pages_per_block`` goes through ``paged_pallas_tpu.resolve_pages_per_block`` (None: ~256
    tokens a step; at most 16 pages and the pages a block walks)."""
    _, hq, d = q.shape
    nb = layout.num_blocks
    limits = layout.key_limit()  # [NB] keys the block's last token sees
    # Empty blocks read page 0: their sequence may be padding past num_seqs, its row anything.
    table = jnp.where(limits[:, None] > 0, page_table[layout.block_seq], 0)  # [NB, P]
    index = jnp.arange(block_q, dtype=jnp.int32)[None, :]  # [1, block_q]
    row_limits = jnp.where(index < layout.block_count[:, None],
                           layout.block_pos0[:, None] + index + 1, 0)  # [NB, block_q]
    out, lse = paged_pallas_tpu.attend_query_blocks(
        blocks_from_tokens(q, layout, block_q), k_pages, v_pages, table, limits, row_limits,
        scale=scale, pages_per_block=pages_per_block, interpret=interpret, k_scales=k_scales,
        v_scales=v_scales, local_window=local_window)  # [NB, block_q, Hq, (D)]
    return (tokens_from_blocks(out.reshape(nb * block_q, hq, d), layout, 0.0),
            tokens_from_blocks(lse.reshape(nb * block_q, hq), layout, -jnp.inf))
