"""Ragged paged attention (prefill chunks and decodes in one launch) as a Pallas kernel for NVIDIA
GPUs (Triton lowering; ``interpret=True`` on CPU). After vLLM's Triton "unified attention".

Algorithm. The step's sequences are cut into query blocks of ``block_q`` tokens that never
straddle a sequence (``ragged_blocks``); there are NB = T // block_q + S of them, the real ones
first, so the grid (NB, Hkv) is a static upper bound and surplus programs find an empty block.
The block -> sequence search runs once in XLA (a ``searchsorted`` over the blocks' cumulative
counts, shared with the gather of q into block order; Triton has no scalar prefetch, so each
program reads its block's sequence, first position and token count with three scalar loads).

Program (b, h) holds block b's tokens x the ``groups`` query heads of KV head h as the M
dimension of its matmuls: [block_q * groups_pad, D] rows, token-major (GQA packs heads into M, so
K/V are never repeated). It walks its sequence's page-table row up to the causal limit of its
last query, ``pages_per_block`` pages per step, from page 0, or with a left window w from the
page holding the block's first query's window start (first query at position pos0: page
max(pos0 - w, 0) // page_size; the later queries' windows start later), so the pages wholly
before every query's window are never read. Each step loads its page ids from the table, gathers
the pages' K and V rows of head h ([pages_per_block * page_size, D], int8 pages dequantized after
the load), scores them, and folds them into a float32 online softmax. Steps whose keys every query
of the block sees (keys <= the first query's position, and with a window keys >= the last query's
position - w) skip the mask; the rest mask keys past each query's position (causal, bottom-right
aligned: query i of a sequence with q_len queries and kv_len keys sits at kv_len - q_len + i) and
before its window, and zero the V rows of keys no real query of the block sees (they may hold
anything, NaN included). An empty block runs no step and writes out 0, lse -inf. There are no
context splits: one program walks a block's whole range, so a step of few long decodes uses few
SMs (``paged_pallas_gpu`` splits a decode's context, or its window, flash-decoding style).

Memory touched: each program reads its q tile once and each page of its range once, so a
sequence's pages are read once per query block and KV head, not once per token; HBM traffic is
the visited pages plus q and the output, which XLA gathers into and out of block order (padding
each sequence to whole blocks: S * block_q rows at most). The page table and block metadata are
kernel inputs.

Shapes. Triton needs power-of-two loads, its dot operands at least 16 wide: the query group is
padded to a power of two, block_q is a power of two with block_q * groups_pad >= 16, D is padded
to a power of two, pages_per_block is a power of two with pages_per_block * page_size >= 16 and
page_size a power of two (checked by the public function); the table and metadata are padded to
power-of-two lengths. A walk that starts at a window's page is not aligned to pages_per_block, so
its last step may read up to pages_per_block - 1 entries past the row's last column: the table is
padded by that much (with page 0, a valid index, whose keys lie past every query).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.attention import tiling
from kernels_pallas.attention.ragged_blocks import (RaggedLayout, blocks_from_tokens,
                                                    tokens_from_blocks)
from kernels_pallas.attention.tiling import MASK_VALUE
from kernels_pallas.backend import triton_compiler_params

_NT = (((1,), (1,)), ((), ()))  # a @ b.T


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    page_size: int
    pages_per_block: int
    groups_pad: int
    interpret: bool
    quantized: bool  # int8 pages with float32 scales per (token, head)
    window: int | None  # keys before its position a query sees (None: all)


def kernel_block_q(block_q: int, groups: int) -> int:
    """block_q (a power of two) raised until block_q x the padded group fills Triton's 16 rows."""
    return max(block_q, tiling.cdiv(tiling.PALLAS_MIN_BLOCK, tiling.next_power_of_2(groups)))


def ragged_paged_attention(q, k_pages, v_pages, page_table, layout: RaggedLayout, *,
                           scale: float, block_q: int, pages_per_block: int, interpret: bool,
                           k_scales=None, v_scales=None, local_window: int | None = None):
    """q [T, Hq, D]; pages [num_pages, page_size, Hkv, D] (page_size a power of two; int8 with
    float32 scales [num_pages, page_size, Hkv]); page_table int32 [S, P]; ``layout`` built with
    ``block_q`` = ``kernel_block_q(...)``; local_window None or the keys before its position a
    query sees -> (out [T, Hq, D] in q.dtype, lse float32 [T, Hq]).

    ``pages_per_block`` is raised to a power of two with pages_per_block * page_size >= 16."""
    t, hq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    groups = hq // hkv
    g_pad = tiling.next_power_of_2(groups)
    rows = block_q * g_pad
    nb = layout.num_blocks
    ppb = max(tiling.next_power_of_2(pages_per_block),
              tiling.cdiv(tiling.PALLAS_MIN_BLOCK, page_size))
    cfg = _Config(scale, page_size, ppb, g_pad, interpret, k_scales is not None, local_window)
    d_pad = tiling.padded_head_dim(d)
    qb = blocks_from_tokens(q, layout, block_q).reshape(nb, block_q, hkv, groups, d)
    qb = tiling.pad_to(tiling.pad_to(qb, 3, g_pad), 4, d_pad)
    qb = qb.transpose(0, 2, 1, 3, 4).reshape(nb, hkv, rows, d_pad)  # M rows: (token, head)
    kp, vp = (tiling.pad_to(x, 3, d_pad) for x in (k_pages, v_pages))
    # Each step reads ppb entries from its first page: a multiple of ppb without a window, any
    # page before the row's end with one. Padding entries point at page 0 (a valid index); their
    # keys lie past every query.
    pages_per_seq = page_table.shape[1]
    columns = (tiling.cdiv(pages_per_seq, ppb) * ppb if local_window is None
               else pages_per_seq + ppb - 1)
    table = tiling.pad_to(tiling.pad_to(page_table, 1, tiling.next_power_of_2(columns)), 0,
                          tiling.next_power_of_2(page_table.shape[0]))
    meta = [tiling.pad_to(x, 0, tiling.next_power_of_2(nb))
            for x in (layout.block_seq, layout.block_pos0, layout.block_count)]
    scales = (k_scales, v_scales) if cfg.quantized else ()
    out, lse = _call(meta, table, qb, kp, vp, scales, cfg)  # [NB, Hkv, rows, (d_pad)]
    out = out.reshape(nb, hkv, block_q, g_pad, d_pad)[:, :, :, :groups, :d]
    lse = lse.reshape(nb, hkv, block_q, g_pad)[:, :, :, :groups]
    out = out.transpose(0, 2, 1, 3, 4).reshape(nb * block_q, hq, d)  # token-major rows
    lse = lse.transpose(0, 2, 1, 3).reshape(nb * block_q, hq)
    return (tokens_from_blocks(out, layout, 0.0).astype(q.dtype),
            tokens_from_blocks(lse, layout, -jnp.inf))


def _kernel(seq_ref, pos_ref, count_ref, table_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config):
    """refs: (k_scale_ref, v_scale_ref, o_ref, lse_ref) with int8 pages, else (o_ref, lse_ref)."""
    ks_ref, vs_ref = refs[:2] if cfg.quantized else (None, None)
    o_ref, lse_ref = refs[-2:]
    b = pl.program_id(0)
    seq, pos0, count = seq_ref[b], pos_ref[b], count_ref[b]
    ps, ppb = cfg.page_size, cfg.pages_per_block
    block = ps * ppb
    q = q_ref[...]  # [rows, D]: the block's tokens, each with its group's query heads
    rows, d_pad = q.shape
    positions = pos0 + jnp.arange(rows, dtype=jnp.int32) // cfg.groups_pad  # [rows]
    # The walk starts at the page holding the first query's window start (page 0 without one).
    base = 0 if cfg.window is None else jnp.maximum(pos0 - cfg.window, 0) // ps
    start = base * ps  # the first key of step 0
    live = count > 0
    steps = jnp.where(live, pos0 + count - start + block - 1, 0) // block  # to the causal limit
    unmasked = jnp.where(live, pos0 + 1 - start, 0) // block  # steps before: keys <= pos0

    def body(step, carry, masked: bool):
        page0 = base + step * ppb
        ids = table_ref[seq, pl.ds(page0, ppb)]  # [ppb] page indices
        k, v = tiling.gather_kv(k_ref, v_ref, ks_ref, vs_ref, ids, q.dtype,
                                (block, d_pad))  # [ppb * page_size, D]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
        mask = v_valid = None
        if masked:
            keys = page0 * ps + jnp.arange(block, dtype=jnp.int32)
            mask = keys[None, :] <= positions[:, None]  # [rows, block]
            # keys no real query of the block sees may hold anything (NaN included): zero their V
            v_valid = keys[:, None] < pos0 + count  # [block, 1]
            if cfg.window is not None:
                mask &= keys[None, :] >= positions[:, None] - cfg.window
                v_valid &= keys[:, None] >= pos0 - cfg.window
            s = jnp.where(mask, s, MASK_VALUE)
        return tiling.online_softmax_step(*carry, s, mask, v, "mk,kd->md", v_valid)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    carry, u0, u1 = init, 0, unmasked  # steps [0, u0) and [u1, steps) masked, [u0, u1) not
    if cfg.window is not None:
        every = jnp.maximum(pos0 + count - 1 - cfg.window - start, 0)  # keys from start + every
        u0 = jnp.minimum((every + block - 1) // block, steps)  # on lie in every query's window
        u1 = jnp.maximum(u0, jnp.minimum(unmasked, steps))
        carry = lax.fori_loop(0, u0, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(u0, u1, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(u1, steps, functools.partial(body, masked=True), carry)
    out, lse = tiling.finish_online_softmax(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _call(meta, table, q, k_pages, v_pages, scales, cfg: _Config):
    nb, hkv, rows, d_pad = q.shape
    num_pages, page_size = k_pages.shape[:2]
    sq = pl.squeezed
    whole = lambda x: pl.BlockSpec(x.shape, lambda b, h: (0,) * x.ndim)  # noqa: E731
    page_spec = pl.BlockSpec((num_pages, page_size, sq, d_pad), lambda b, h: (0, 0, h, 0))
    scale_spec = pl.BlockSpec((num_pages, page_size, sq), lambda b, h: (0, 0, h))
    tile = pl.BlockSpec((sq, sq, rows, d_pad), lambda b, h: (b, h, 0, 0))
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(nb, hkv),
        in_specs=[*map(whole, meta), whole(table), tile, page_spec, page_spec,
                  *[scale_spec] * len(scales)],
        out_specs=[tile, pl.BlockSpec((sq, sq, rows), lambda b, h: (b, h, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((nb, hkv, rows), jnp.float32)],
        # The flash forward's warp rule (pallas_gpu.py), not the decode kernel's: a query block
        # holds ~64 rows like the forward's q tile, so its accumulator is as large.
        compiler_params=triton_compiler_params(4 if d_pad <= 64 else 8, 2, cfg.interpret),
        interpret=cfg.interpret,
        name="ragged_paged_attention",
    )(*meta, table, q, k_pages, v_pages, *scales)
