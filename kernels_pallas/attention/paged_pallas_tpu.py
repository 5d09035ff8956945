"""Paged decode attention as a Pallas kernel for TPUs (Mosaic lowering; ``interpret=True`` on CPU).

Query blocks. The kernel attends *blocks* of query tokens, each block over one page-table row: a
decode is a block of one token per sequence; ``ragged_pallas_tpu`` passes blocks of ``block_q``
tokens of one sequence each (``attend_query_blocks``), with a key limit per token (the causal
mask). Below, "sequence" is a block and its "length" the keys its last token sees.

Algorithm. Grid (batch, KV head blocks, page steps); the page-step axis is the innermost,
sequential ("arbitrary") one, and a float32 online softmax (running max m, sum l, accumulator)
lives in VMEM scratch across it, as in the TPU flash-attention kernel (``pallas_tpu.py``). The
lengths, the page table (flattened: SMEM pads 2-D arrays) and the first key each block sees are
scalar-prefetched into SMEM (``PrefetchScalarGridSpec``), so the BlockSpec index maps read the
table and each step's K/V blocks are the *physical* pages the sequence uses: step j of sequence b
fetches pages ``page_table[b, first + j * ppb + i]`` for i < ``pages_per_block`` (ppb; one
BlockSpec per page, since pages are not contiguous). Without a window first = 0 and the grid has
the steps of the whole table row. With a left window w, first is the page holding the first key the
block sees (``first_page``: the decode's length - 1 - w; a block of tokens, its first token's),
scalar-prefetched per block, and the grid has only the steps of the pages its window can straddle
(``tiling.span_pages``): a 4K-token window over a 128K-token table walks ~17 steps of 16 pages, not
512, so neither the pages before the window nor the per-step overhead of the steps over them is
paid. The pipeline fetches a block only when its block index changes from the previous grid step,
so the index map (``table_column``) never moves a slot off its page without need: in the step
holding a sequence's end, a slot past the length keeps the page it held in the previous step, and
the steps wholly past the length repeat that last real step's pages. Each (sequence, head block)
thus fetches only its needed pages, plus, when it needs fewer than ppb pages, step 0's padding
slots (each must hold some page; they hold the last one). ``pl.when`` skips the steps wholly past
the length, and positions >= length within a step are masked (with per-token limits, positions >=
the row's token's limit, a [rows, 1] VMEM tile per block); with a window, positions < limit - 1 - w
are masked too. The V rows of positions >= length, and before the first key the block sees, are
zeroed, since those slots may hold anything (NaN included) and a masked weight 0 times NaN is NaN.
The last step writes out = acc / l and lse = m + log(l); a sequence of length 0 sees nothing and
gets out 0, lse -inf. There is no context split: a TPU core runs the grid in order, so splitting
(the GPU kernel's flash-decoding) would add a merge without adding parallelism; batch and KV head
blocks are "parallel" for megacore chips.

SMEM budget. SMEM is small (1 MiB up to v6e) and a scalar-prefetched table must fit in it whole:
the model's paged attention passes one table row per *token* of a step (e.g. 512 rows of 512
pages = 1 MiB), which fails to compile (vLLM PR #9350, torch_xla #8515). The wrapper therefore
splits the batch (of sequences or query blocks, one table row each) into the fewest equal chunks
whose [rows, pages_per_seq] table stays within ``MAX_TABLE_ENTRIES`` and runs the kernel per chunk
under ``lax.map`` (one kernel, compiled once); a batch that fits is one call.

Layout. Pages stay in vLLM's [num_pages, page_size, Hkv, D] layout, viewed (a free reshape) as
[num_pages, page_size, Hkv * D]. Mosaic wants the last two block dims divisible by (8, 128) or
whole: page_size is whole, and a program takes a lane block of ``hb`` KV heads, hb * D lanes,
with hb the fewest heads whose lanes are a multiple of 128 (1 for D = 128 or 256; all Hkv when
no divisor fits). So no shape is refused, and nothing is copied or transposed per call.

GQA and head blocks. A block's tokens x the ``groups = Hq / Hkv`` query heads of a KV head are
scored in one matmul (rows token-major). With hb > 1 (D < 128, e.g. 64 or 80), the wrapper writes
the queries block-diagonally: row (t, j, g) of the [tokens * hb * groups, hb * D] query tile holds
token t's query head g of KV head j in lanes [j * D, (j + 1) * D) and zeros elsewhere, so one
[rows, lanes] x [lanes, page_size] matmul gives every head's scores with no lane slicing inside
the kernel; the P @ V product then fills all lanes, and the wrapper keeps each row's own head's
lanes (the diagonal blocks). The MXU does hb times the work it needs, which decode (bound by HBM
reads of the pages) does not notice; a prefill block (more rows per page) pays it in compute.

int8 pages. Scales [num_pages, page_size, Hkv] (per token and head) come whole per page
([page_size, Hkv], small); the kernel picks its heads' columns with a one-hot lane reduction,
spreads them over their D lanes and dequantizes the gathered page in float32 before casting it to
q's dtype, so HBM traffic is the int8 pages.

Memory touched per program: its query tile (and row limits) once; per visited page, its lane
block of K and V (plus that page's scales); the output tile and lse once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.attention import tiling
from kernels_pallas.attention.tiling import MASK_VALUE

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
LANES = 128  # TPU vector lanes: a lane block of KV heads is a multiple of this (or all of them)
TARGET_BLOCK_TOKENS = 256  # tokens per grid step, to amortize the ~0.35 us per-step overhead
MAX_PAGES_PER_BLOCK = 16  # one BlockSpec (a DMA) per page: bound the inputs and unrolled steps
# Page-table entries (int32) one kernel call scalar-prefetches into SMEM: 64 KiB, a 16th of the
# 1 MiB SMEM of recent TPUs (up to v6e), leaving room for the lengths and Mosaic's own scalars.
# A larger batch's table runs in chunks (``batch_chunks``).
MAX_TABLE_ENTRIES = 16 * 1024


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    page_size: int
    pages_per_seq: int
    span: int  # pages a block's keys can lie in, from its first page on (the grid's steps)
    pages_per_block: int
    heads_per_block: int  # hb: KV heads in one lane block
    head_dim: int
    quantized: bool  # int8 pages with float32 scales per (token, head)
    row_limits: bool  # a key limit per query row (ragged blocks), else the block's length
    window: int | None  # keys before its position (its limit - 1) a query sees (None: all)
    interpret: bool


def heads_per_block(hkv: int, head_dim: int) -> int:
    """The fewest KV heads (a divisor of Hkv) whose hb * D lanes are a multiple of 128, else Hkv
    (a whole-row block, which Mosaic also accepts)."""
    for hb in range(1, hkv + 1):
        if hkv % hb == 0 and (hb * head_dim) % LANES == 0:
            return hb
    return hkv


def default_pages_per_block(page_size: int, span: int) -> int:
    """~TARGET_BLOCK_TOKENS per step, at most MAX_PAGES_PER_BLOCK pages and the ``span`` pages a
    block walks (the table's width, or a window's pages)."""
    wanted = max(1, TARGET_BLOCK_TOKENS // page_size)
    return max(1, min(wanted, MAX_PAGES_PER_BLOCK, span))


def resolve_pages_per_block(pages_per_block: int | None, page_size: int, span: int) -> int:
    """None: ``default_pages_per_block``; a requested value is clipped to
    [1, min(MAX_PAGES_PER_BLOCK, span)], ``span`` the pages a block walks (``tiling.span_pages``;
    the option is shared with the other backends, so a value that suits them must not fail
    here)."""
    if pages_per_block is None:
        return default_pages_per_block(page_size, span)
    return max(1, min(pages_per_block, MAX_PAGES_PER_BLOCK, span))


def batch_chunks(batch: int, pages_per_seq: int, max_table_entries: int) -> tuple[int, int]:
    """(kernel calls, sequences per call): the fewest calls whose [rows, pages_per_seq] table has
    at most ``max_table_entries`` entries, with the rows spread evenly so that padding the batch
    to calls * rows adds fewer than ``calls`` rows. A single row wider than the budget goes alone
    (its table must be in SMEM whole)."""
    max_rows = max(1, max_table_entries // pages_per_seq)
    if batch <= max_rows:
        return 1, batch
    calls = tiling.cdiv(batch, max_rows)
    return calls, tiling.cdiv(batch, calls)


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           page_table: jax.Array, lengths: jax.Array, *, scale: float,
                           pages_per_block: int | None, interpret: bool,
                           k_scales: jax.Array | None = None,
                           v_scales: jax.Array | None = None,
                           local_window: int | None = None) -> tuple[jax.Array, jax.Array]:
    """q [batch, Hq, D]; pages [num_pages, page_size, Hkv, D] (q's dtype, or int8 with float32
    scales [num_pages, page_size, Hkv]); page_table int32 [batch, pages_per_seq]; lengths int32
    [batch]; local_window None or the keys before the query it sees
    -> (out [batch, Hq, D] in q.dtype, lse float32 [batch, Hq]).

    Inputs are validated by the public function. ``pages_per_block`` goes through
    ``resolve_pages_per_block`` (None: the default; else clipped to MAX_PAGES_PER_BLOCK and the
    span a block walks: the table's width, or a window's pages). Any page_size and head dim work (multiples of 8 / 16 / 32 rows for float32 /
    bfloat16 / int8 pages tile best). Batches whose table exceeds ``MAX_TABLE_ENTRIES`` run in
    chunks (see the module docstring).
    """
    out, lse = attend_query_blocks(q[:, None], k_pages, v_pages, page_table, lengths, None,
                                   scale=scale, pages_per_block=pages_per_block,
                                   interpret=interpret, k_scales=k_scales, v_scales=v_scales,
                                   local_window=local_window)
    return out[:, 0], lse[:, 0]


def attend_query_blocks(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array,
                        lengths: jax.Array, row_limits: jax.Array | None, *, scale: float,
                        pages_per_block: int | None, interpret: bool,
                        k_scales: jax.Array | None = None,
                        v_scales: jax.Array | None = None,
                        local_window: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Blocks of query tokens, each over its own page-table row (the kernel of this module).

    q [n, tokens, Hq, D]; pages as in ``paged_decode_attention``; table int32 [n, pages_per_seq]:
    block b's row; lengths int32 [n]: keys block b needs (the pages past them are neither fetched
    nor scored); row_limits int32 [n, tokens] or None: token t of block b sees keys
    0 .. row_limits[b, t] - 1 (each <= lengths[b]; 0: nothing), None: all of its block's length;
    local_window None or the keys a token sees before its last one (limit - 1 - window on; the
    pages before the earliest such key of a block are neither fetched nor scored)
    -> (out [n, tokens, Hq, D] in q.dtype, lse float32 [n, tokens, Hq]).
    """
    n, tokens, hq, d = q.shape
    num_pages, page_size, hkv, _ = k_pages.shape
    groups = hq // hkv
    pages_per_seq = table.shape[1]
    hb = heads_per_block(hkv, d)
    span = tiling.span_pages(pages_per_seq, page_size, local_window, tokens)
    cfg = _Config(scale=scale, page_size=page_size, pages_per_seq=pages_per_seq, span=span,
                  pages_per_block=resolve_pages_per_block(pages_per_block, page_size, span),
                  heads_per_block=hb, head_dim=d, quantized=k_scales is not None,
                  row_limits=row_limits is not None, window=local_window, interpret=interpret)
    lowest = jnp.zeros((n,), jnp.int32)  # [n] the first key a block's rows see
    if local_window is not None:
        # Rows that see nothing (limit 0) do not count: min over the others (all: the length).
        limits = lengths if row_limits is None else jnp.min(
            jnp.where(row_limits > 0, row_limits, lengths[:, None]), axis=1)
        lowest = limits.astype(jnp.int32) - 1 - local_window
    nhb = hkv // hb
    # Block-diagonal queries: row (t, j, g) holds token t's query head g of KV head j in lanes of
    # head j.
    qg = q.reshape(n, tokens, nhb, hb, 1, groups, d)
    eye = jnp.eye(hb, dtype=q.dtype)[:, :, None, None]  # [hb, hb, 1, 1]
    qx = (qg * eye).transpose(0, 2, 1, 3, 5, 4, 6)  # [n, nhb, tokens, hb, groups, hb, D]
    qx = qx.reshape(n, nhb, tokens * hb * groups, hb * d)  # [n, nhb, rows, lanes]
    operands = [qx]
    if row_limits is not None:  # one limit per row: token t's, repeated over its heads
        operands.append(jnp.repeat(row_limits.astype(jnp.int32), hb * groups,
                                   axis=1)[..., None])  # [n, rows, 1]
    pages = [x.reshape(num_pages, page_size, hkv * d) for x in (k_pages, v_pages)]  # free views
    scales = [k_scales, v_scales] if cfg.quantized else []
    call = functools.partial(_call, pages=pages, scales=scales, cfg=cfg)
    out, lse = _call_in_chunks(call, table.astype(jnp.int32), lengths.astype(jnp.int32), lowest,
                               *operands)
    # out [n, nhb, rows, hb * D]: keep each row's own head's lanes.
    out = out.reshape(n, nhb, tokens, hb, groups, hb, d)
    out = jnp.moveaxis(jnp.diagonal(out, axis1=3, axis2=5), -1, 3)  # [n, nhb, tokens, hb, g, D]
    out = jnp.swapaxes(out, 1, 2).reshape(n, tokens, hq, d)
    lse = jnp.swapaxes(lse.reshape(n, nhb, tokens, hb * groups), 1, 2).reshape(n, tokens, hq)
    return out.astype(q.dtype), lse


def _call_in_chunks(call: Callable[..., tuple[jax.Array, jax.Array]], table: jax.Array,
                    lens: jax.Array, *operands: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``call(flat table, lens, *operands)`` on chunks of the batch whose table fits
    MAX_TABLE_ENTRIES.

    table int32 [batch, pages_per_seq]; lens int32 [batch]; operands [batch, ...] (the first keys
    seen, the query tiles, the row limits) -> call's (out [batch, ...], lse [batch, ...]). Padding
    sequences have length 0, page 0 and zeros: they attend to nothing (one fetch of page 0 per
    slot) and are dropped.
    """
    batch, width = table.shape
    calls, seqs = batch_chunks(batch, width, MAX_TABLE_ENTRIES)  # seqs per call
    if calls == 1:
        return call(table.reshape(-1), lens, *operands)
    pad = calls * seqs - batch  # < calls
    table, lens, *operands = (jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
                              for x in (table, lens, *operands))
    chunks = (table.reshape(calls, seqs * width),  # [calls, seqs * pages_per_seq], flat per call
              lens.reshape(calls, seqs),  # [calls, seqs]
              *(x.reshape(calls, seqs, *x.shape[1:]) for x in operands))  # [calls, seqs, ...]
    outs = lax.map(lambda c: call(*c), chunks)  # each [calls, seqs, ...]
    return tuple(x.reshape(calls * seqs, *x.shape[2:])[:batch] for x in outs)


def _dequantized(page_ref, scale_ref, head_block, cfg: _Config, dtype):
    """One page's lane block [page_size, hb * D] in ``dtype``; int8 values times their scales."""
    x = page_ref[...]  # [page_size, hb * D]
    if scale_ref is None:
        return x
    sc = scale_ref[...]  # [page_size, Hkv] float32
    heads = lax.broadcasted_iota(jnp.int32, sc.shape, 1)
    lanes = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    full = jnp.zeros(x.shape, jnp.float32)
    for j in range(cfg.heads_per_block):  # static: each head's scale column over its D lanes
        head = head_block * cfg.heads_per_block + j
        col = jnp.sum(jnp.where(heads == head, sc, 0.0), axis=1, keepdims=True)  # [page_size, 1]
        own = (lanes >= j * cfg.head_dim) & (lanes < (j + 1) * cfg.head_dim)
        full = jnp.where(own, col, full)
    return (x.astype(jnp.float32) * full).astype(dtype)


def _kernel(lens_ref, table_ref, lowest_ref, q_ref, *refs, cfg: _Config):
    """refs: (row limits), ppb K pages, ppb V pages, (ppb K scales, ppb V scales), out, lse, acc,
    m, l."""
    ppb, ps = cfg.pages_per_block, cfg.page_size
    limit_ref, refs = (refs[0], refs[1:]) if cfg.row_limits else (None, refs)
    n_in = ppb * (4 if cfg.quantized else 2)
    k_refs, v_refs = refs[:ppb], refs[ppb:2 * ppb]
    ks_refs = refs[2 * ppb:3 * ppb] if cfg.quantized else (None,) * ppb
    vs_refs = refs[3 * ppb:4 * ppb] if cfg.quantized else (None,) * ppb
    o_ref, lse_ref, acc_ref, m_ref, l_ref = refs[n_in:]
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length, lowest = lens_ref[b], lowest_ref[b]
    start = (first_page(lowest, ps) + j * ppb) * ps  # first position of this step

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)

    @pl.when(start < length)
    def _step():
        q = q_ref[...]  # [rows, lanes]
        acc, m, l = acc_ref[...], m_ref[...], l_ref[...]  # [rows, lanes], [rows, 1], [rows, 1]
        limit = length if limit_ref is None else limit_ref[...]  # keys seen: scalar or [rows, 1]
        for i in range(ppb):  # static; slots past the length hold an earlier page, masked
            k = _dequantized(k_refs[i], ks_refs[i], h, cfg, q.dtype)  # [page_size, lanes]
            s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
            pos = start + i * ps + lax.broadcasted_iota(jnp.int32, s.shape, 1)  # [rows, ps]
            mask = pos < limit
            if cfg.window is not None:
                mask &= pos >= limit - 1 - cfg.window
            s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
            corr = jnp.exp(m - m_new)
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            l = l * corr + p.sum(axis=1, keepdims=True)
            v = _dequantized(v_refs[i], vs_refs[i], h, cfg, q.dtype)  # [page_size, lanes]
            # Slots past the block's length or before every row's window may hold anything (NaN
            # included) and 0 * NaN is NaN: zero their V rows. Rows past a token's own limit
            # (< length) are real tokens.
            key = start + i * ps + lax.broadcasted_iota(jnp.int32, v.shape, 0)
            v = jnp.where((key < length) & (key >= lowest), v, jnp.zeros((), v.dtype))
            acc = acc * corr + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            m = m_new
        acc_ref[...], m_ref[...], l_ref[...] = acc, m, l

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...], lse_ref[...] = tiling.finish_online_softmax(
            acc_ref[...], m_ref[...], l_ref[...], keepdims=True)  # [rows, lanes], [rows, 1]


def first_page(lowest: jax.Array, page_size: int) -> jax.Array:
    """The page (within the sequence) holding key ``lowest``, the first one a block sees (< 0:
    page 0); a block's steps walk its pages from there."""
    # lax.div: jnp's floor division lowers through sign(), which Mosaic lowers only on a TPU.
    return lax.div(jnp.maximum(lowest, 0), page_size)


def table_column(length: jax.Array, lowest: jax.Array, j: jax.Array | int, i: jax.Array | int,
                 page_size: int, pages_per_block: int) -> jax.Array:
    """The page-table column (page index within the sequence) that page slot i reads at step j
    for a sequence of ``length`` tokens whose first seen key is ``lowest`` (0 without a window):
    first + j * ppb + i while that page is in use, first = ``first_page(lowest)``. The pipeline
    fetches a slot's block only when its index changes, so a slot past the end must not move:

    - steps past the last one in use (jj = (last - first) // ppb) repeat that step's columns;
    - in that step, a slot past the last page keeps its column of the step before (jj - 1), or,
      at step 0 where there is none, reads the last page (padding: some page must be there).

    Works on int32 scalars (the index map, traced) and arrays (tests): j may be a vector.
    """
    ppb = pages_per_block
    first = first_page(lowest, page_size)
    last = jnp.maximum(lax.div(length + page_size - 1, page_size) - 1, first)  # first if empty
    jj = jnp.minimum(j, lax.div(last - first, ppb))
    col = first + jj * ppb + i
    return jnp.where(col > last, jnp.where(jj > 0, col - ppb, last), col)


def _page_map(i: int, cfg: _Config):
    """Index map of page slot i of each step: the physical page at ``table_column``."""
    ps, ppb, width = cfg.page_size, cfg.pages_per_block, cfg.pages_per_seq

    def index_map(b, h, j, lens, table, lowest):
        return table[b * width + table_column(lens[b], lowest[b], j, i, ps, ppb)], 0, h

    return index_map


def _scale_map(i: int, cfg: _Config):
    page = _page_map(i, cfg)

    def index_map(b, h, j, lens, table, lowest):
        return page(b, h, j, lens, table, lowest)[0], 0, 0

    return index_map


def _call(table: jax.Array, lens: jax.Array, lowest: jax.Array, qx: jax.Array,
          *row_limits: jax.Array, pages: list[jax.Array], scales: list[jax.Array],
          cfg: _Config) -> tuple[jax.Array, jax.Array]:
    """table int32 [batch * pages_per_seq]; lens int32 [batch]; lowest int32 [batch] (the first
    key a block sees); qx [batch, nhb, rows, lanes]; row_limits: int32 [batch, rows, 1] with
    ``cfg.row_limits``, else nothing; pages
    2 x [num_pages, page_size, Hkv * D]; scales 0 or 2 x [num_pages, page_size, Hkv]
    -> (out float32 [batch, nhb, rows, lanes], lse float32 [batch, nhb, rows, 1])."""
    from jax.experimental.pallas import tpu as pltpu  # TPU dialect; importable on any jaxlib

    batch, nhb, rows, lanes = qx.shape
    ps, ppb = cfg.page_size, cfg.pages_per_block
    hkv = scales[0].shape[2] if scales else 0
    sq = pl.squeezed
    n_steps = tiling.cdiv(cfg.span, ppb)
    tile = lambda b, h, j, lens, table, lowest: (b, h, 0, 0)  # noqa: E731
    page_specs = [pl.BlockSpec((sq, ps, lanes), _page_map(i, cfg)) for i in range(ppb)]
    scale_specs = [pl.BlockSpec((sq, ps, hkv), _scale_map(i, cfg)) for i in range(ppb)]
    in_specs = [pl.BlockSpec((sq, sq, rows, lanes), tile)]
    in_specs += [pl.BlockSpec((sq, rows, 1), lambda b, h, j, lens, table, lowest: (b, 0, 0))
                 ] * len(row_limits)
    in_specs += [*page_specs, *page_specs]
    args = [*row_limits, *[pages[0]] * ppb, *[pages[1]] * ppb]  # one operand per page slot
    if scales:
        in_specs += [*scale_specs, *scale_specs]
        args += [*[scales[0]] * ppb, *[scales[1]] * ppb]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(batch, nhb, n_steps), in_specs=in_specs,
        out_specs=[pl.BlockSpec((sq, sq, rows, lanes), tile),
                   pl.BlockSpec((sq, sq, rows, 1), tile)],
        scratch_shapes=[pltpu.VMEM((rows, lanes), jnp.float32),
                        pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((batch, nhb, rows, lanes), jnp.float32),
                   jax.ShapeDtypeStruct((batch, nhb, rows, 1), jnp.float32)],
        compiler_params=None if cfg.interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="ragged_paged_attention_tpu" if cfg.row_limits else "paged_decode_attention_tpu",
    )(lens, table, lowest, qx, *args)
