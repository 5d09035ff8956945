"""Paged decode attention as a Pallas flash-decoding kernel for NVIDIA GPUs (Triton lowering;
``interpret=True`` on CPU).

Algorithm (flash-decoding). Grid (batch, Hkv, num_splits). The splits cut a sequence's *span*,
the pages its query can see, into ``num_splits`` contiguous runs of ``pages_per_split`` page-table
entries (``split_layout``). Without a window the span is the whole table and run s of sequence b
covers entries s * pages_per_split .. on. With a left window w the span is the pages the window's
w + 1 keys can straddle (``tiling.span_pages``: cdiv(w, page_size) + 1, at most the table's
width), and each sequence's runs start at the page its window begins in: run s covers entries
first_page + s * pages_per_split .. on, first_page = max(length - 1 - w, 0) // page_size. So a
4K-token window over a 128K-token table is cut into splits that each hold part of the window,
rather than most splits looping over nothing while a few walk the whole window. Program (b, h, s)
walks its run up to the last page its length reaches, ``pages_per_block`` pages per step: it reads
those page indices from the page table, gathers the pages' K and V rows of KV head h into a
[pages_per_block * page_size, D] tile, scores it against all ``groups`` query heads of the head
group at once ([groups, D] x [D, block]), masks positions >= length and, with a window, positions
< length - 1 - w (zeroing their V rows: those slots may hold anything, NaN included), and keeps a
float32 online softmax (running max, sum, accumulator). It writes a partial output [groups, D] and
its log-sum-exp; runs past the length write out 0 and lse -inf. The splits are then merged exactly
with ``merge_attention`` (an XLA epilogue over [batch, Hkv, num_splits, groups, D] float32, small
next to the KV pages).

Memory touched: each program reads its q tile once, and each KV page of its run once (K/V are
read once per KV head, not once per query head); HBM traffic is the visited pages (with a window,
the window's pages only) plus the partials. The page table and lengths are kernel inputs (Triton
has no scalar prefetch).

Shapes. Triton needs power-of-two loads of at least 16 for its dot: the wrapper pads the query
group to a power of two >= 16, D to a power of two, and the page table and lengths to power-of-two
lengths; page_size must be a power of two (checked by the public function) and
pages_per_block * page_size >= 16. ``pages_per_split`` is a multiple of ``pages_per_block``, so a
block never reaches into the next split's pages. A run that starts at a window's first page is not
aligned to ``pages_per_block``, so its last step may read up to pages_per_block - 1 entries past
the table's last column: the table is padded by that much (with page 0, a valid index, whose
positions lie past every length). A head dim that is not a power of two (80, 96) costs a padded
copy of the whole page pool per call: keep D a power of two for serving.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.attention import tiling
from kernels_pallas.attention.merge import merge_attention
from kernels_pallas.attention.tiling import MASK_VALUE
from kernels_pallas.backend import triton_compiler_params

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
TARGET_PROGRAMS = 256  # enough programs to fill an H100's 132 SMs about twice
MIN_PAGES_PER_SPLIT = 4  # below this, merging partials costs more than the extra parallelism
TARGET_BLOCK_TOKENS = 64  # tokens per step: the Triton FA2 forward's KV tile at D <= 128


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    page_size: int
    pages_per_block: int
    pages_per_split: int
    num_splits: int
    interpret: bool
    quantized: bool  # int8 pages with float32 scales per (token, head)
    window: int | None  # keys before the query it sees (None: all)


def default_num_splits(batch: int, hkv: int, span: int) -> int:
    """Split a query's span of pages (``tiling.span_pages``) until batch x Hkv x splits reaches
    ~TARGET_PROGRAMS (a power of two), keeping >= MIN_PAGES_PER_SPLIT pages a split."""
    splits = tiling.next_power_of_2(tiling.cdiv(TARGET_PROGRAMS, batch * hkv))
    most = max(1, span // MIN_PAGES_PER_SPLIT)
    while splits > 1 and splits > most:
        splits //= 2
    return splits


def split_layout(span: int, num_splits: int, pages_per_block: int) -> tuple[int, int]:
    """(pages_per_split, num_splits) cutting ``span`` pages into at most ``num_splits`` runs of a
    multiple of ``pages_per_block`` pages each, none of them wholly past the span."""
    num_splits = max(1, min(num_splits, tiling.cdiv(span, pages_per_block)))
    per_split = tiling.cdiv(tiling.cdiv(span, num_splits), pages_per_block) * pages_per_block
    return per_split, tiling.cdiv(span, per_split)


def default_pages_per_block(page_size: int, span: int) -> int:
    """A power of two giving ~TARGET_BLOCK_TOKENS per step (no more than the ``span`` pages to walk
    need), and >= 16 tokens (Triton's dot)."""
    wanted = max(1, TARGET_BLOCK_TOKENS // page_size)
    return max(min(wanted, tiling.next_power_of_2(span)),
               tiling.cdiv(tiling.PALLAS_MIN_BLOCK, page_size))


def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, scale: float,
                           num_splits: int, pages_per_block: int | None, interpret: bool,
                           k_scales=None, v_scales=None, local_window: int | None = None):
    """q [batch, Hq, D]; pages [num_pages, page_size, Hkv, D] (page_size a power of two; int8
    with float32 scales [num_pages, page_size, Hkv], dequantized in the kernel after the gather);
    page_table int32 [batch, pages_per_seq]; lengths int32 [batch]; local_window None or the keys
    before the query it sees -> (out [batch, Hq, D] in q.dtype, lse float32 [batch, Hq]).

    ``pages_per_block`` (None: ``default_pages_per_block`` over the span) is raised to a power of
    two with pages_per_block * page_size >= 16; ``num_splits`` shrinks so that no split lies wholly
    past the span (``tiling.span_pages``: the table row, or a window's pages).
    """
    batch, hq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    groups = hq // hkv
    pages_per_seq = page_table.shape[1]
    span = tiling.span_pages(pages_per_seq, page_size, local_window)
    if pages_per_block is None:
        pages_per_block = default_pages_per_block(page_size, span)
    ppb = max(tiling.next_power_of_2(pages_per_block),
              tiling.cdiv(tiling.PALLAS_MIN_BLOCK, page_size))
    per_split, num_splits = split_layout(span, num_splits, ppb)
    quantized = k_scales is not None
    cfg = _Config(scale, page_size, ppb, per_split, num_splits, interpret, quantized,
                  local_window)
    d_pad = tiling.padded_head_dim(d)
    g_pad = max(tiling.PALLAS_MIN_BLOCK, tiling.next_power_of_2(groups))
    qg = q.reshape(batch, hkv, groups, d)  # [batch, Hkv, groups, D]
    qg = tiling.pad_to(tiling.pad_to(qg, 2, g_pad), 3, d_pad)
    kp = tiling.pad_to(k_pages, 3, d_pad)
    vp = tiling.pad_to(v_pages, 3, d_pad)
    # Each step reads ppb entries from its first page: a multiple of ppb without a window, any
    # page before the row's end with one. Padding entries point at page 0 (a valid index); their
    # positions are past every length.
    columns = (tiling.cdiv(pages_per_seq, ppb) * ppb if local_window is None
               else pages_per_seq + ppb - 1)
    table = tiling.pad_to(page_table.astype(jnp.int32), 1, tiling.next_power_of_2(columns))
    lens = tiling.pad_to(lengths.astype(jnp.int32), 0, tiling.next_power_of_2(batch))
    scales = (k_scales, v_scales) if quantized else ()
    # [batch, Hkv, splits, g_pad, (d_pad)]
    out, lse = _partials(qg, kp, vp, scales, table, lens, cfg)
    out, lse = out[:, :, :, :groups, :d], lse[:, :, :, :groups]
    merged_out, merged_lse = out[:, :, 0], lse[:, :, 0]
    for s in range(1, num_splits):
        merged_out, merged_lse = merge_attention(merged_out, merged_lse, out[:, :, s], lse[:, :, s])
    return (merged_out.reshape(batch, hq, d).astype(q.dtype), merged_lse.reshape(batch, hq))


def _kernel(len_ref, table_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config):
    """refs: (k_scale_ref, v_scale_ref, o_ref, lse_ref) with int8 pages, else (o_ref, lse_ref)."""
    ks_ref, vs_ref = refs[:2] if cfg.quantized else (None, None)
    o_ref, lse_ref = refs[-2:]
    b, split = pl.program_id(0), pl.program_id(2)
    ps, ppb = cfg.page_size, cfg.pages_per_block
    block = ps * ppb
    length = len_ref[b]
    lowest = 0 if cfg.window is None else length - 1 - cfg.window  # first key the query sees
    # The span starts at the page holding the window's first key (page 0 without a window).
    first = jnp.maximum(lowest, 0) // ps + split * cfg.pages_per_split
    last = jnp.minimum(first + cfg.pages_per_split, (length + ps - 1) // ps)
    steps = jnp.maximum(last - first + ppb - 1, 0) // ppb
    q = q_ref[...]  # [g_pad, D]
    d_pad = q.shape[1]

    def body(step, carry):
        page0 = first + step * ppb
        ids = table_ref[pl.ds(page0, ppb)]  # [ppb] page indices
        k, v = tiling.gather_kv(k_ref, v_ref, ks_ref, vs_ref, ids, q.dtype,
                                (block, d_pad))  # gathered [ppb * page_size, D]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
        pos = page0 * ps + jnp.arange(block, dtype=jnp.int32)  # [block]
        valid = (pos < length) & (pos >= lowest)  # [block]
        s = jnp.where(valid[None, :], s, MASK_VALUE)  # [g_pad, block]
        # slots past the length may hold anything (NaN included): zero their V rows
        return tiling.online_softmax_step(*carry, s, valid[None, :], v, "mk,kd->md",
                                          valid[:, None])

    g_pad = q.shape[0]
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((g_pad,), -jnp.inf, jnp.float32),
            jnp.zeros((g_pad,), jnp.float32))
    # An empty loop when the run lies past the length.
    carry = lax.fori_loop(0, steps, body, init)
    o_ref[...], lse_ref[...] = tiling.finish_online_softmax(*carry)


def _partials(q, k_pages, v_pages, scales, table, lens, cfg: _Config):
    batch, hkv, g_pad, d_pad = q.shape
    num_pages, page_size = k_pages.shape[:2]
    sq = pl.squeezed
    splits = cfg.num_splits
    page_spec = pl.BlockSpec((num_pages, page_size, sq, d_pad), lambda b, h, s: (0, 0, h, 0))
    scale_spec = pl.BlockSpec((num_pages, page_size, sq), lambda b, h, s: (0, 0, h))
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(batch, hkv, splits),
        in_specs=[
            pl.BlockSpec((lens.shape[0],), lambda b, h, s: (0,)),
            pl.BlockSpec((sq, table.shape[1]), lambda b, h, s: (b, 0)),
            pl.BlockSpec((sq, sq, g_pad, d_pad), lambda b, h, s: (b, h, 0, 0)),
            page_spec,
            page_spec,
            *[scale_spec] * len(scales),
        ],
        out_specs=[pl.BlockSpec((sq, sq, sq, g_pad, d_pad), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((sq, sq, sq, g_pad), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((batch, hkv, splits, g_pad, d_pad), jnp.float32),
                   jax.ShapeDtypeStruct((batch, hkv, splits, g_pad), jnp.float32)],
        # 4 warps up to D = 128, one step further than the flash forward's rule (pallas_gpu.py):
        # a decode tile has only g_pad (16 for most models) query rows, so its [g_pad, D] float32
        # accumulator is a quarter of the forward's, and decode is bound by reading the pages,
        # not by the matmuls. Neither rule has been measured against the other.
        compiler_params=triton_compiler_params(4 if d_pad <= 128 else 8, 2,
                                                      cfg.interpret),
        interpret=cfg.interpret,
        name="paged_decode_attention",
    )(lens, table, q, k_pages, v_pages, *scales)
