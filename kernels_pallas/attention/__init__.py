"""Attention: ``flash_attention``, ``paged_decode_attention``, ``ragged_paged_attention``,
``merge_attention`` and the ``tile_fraction`` helper (``sparsity.py``).

One function, several implementations (the pattern of ../shared/DESIGN.md):

* ``reference`` (``reference.py``): plain jnp in float32, materializes the scores. The oracle.
* ``xla`` (``xla.py``): online softmax over KV blocks in jnp, memory linear in S, block-sparse loop
  bounds, custom VJP. What CPU users run.
* ``pallas`` (``pallas_gpu.py``): FlashAttention-2 Pallas kernels (forward, dq, dk/dv) lowered
  through Triton on NVIDIA GPUs; on CPU they run with ``interpret=True`` (how the tests exercise
  them).
* ``pallas_tpu`` (``pallas_tpu.py``): the same algorithm as Mosaic kernels for TPUs (the KV loop
  is the grid's sequential axis, softmax state in VMEM scratch); what ``pallas`` and ``auto`` run
  on a TPU. Named explicitly it runs interpreted off a TPU, which is how CPU tests reach it.
* ``pallas_mgpu`` (``pallas_mgpu.py``): ``flash_attention`` only. A Mosaic GPU forward for Hopper
  (wgmma on shared-memory tiles, a TMA-fed K/V pipeline), bfloat16/float16, D <= 128, causal,
  local windows, soft-cap, GQA, no segment ids; the backward reuses the Triton kernels of
  ``pallas_gpu.py``, or with ``BlockSizes(mgpu_backward="mosaic")`` runs Mosaic GPU dk/dv and dq
  kernels (``pallas_mgpu_bwd.py``; opt-in until measured on a GPU). Off a GPU it runs in jax's
  GPU interpret mode (how the tests reach it). Opt-in: ``auto`` does not pick it until a GPU
  measurement shows it faster than Triton.
* ``auto``: pallas on GPU and TPU, xla on CPU.

``paged_decode_attention`` follows the same pattern: ``reference.py`` (gather every page, dense
attention), ``paged_xla.py`` (online softmax over chunks of pages), ``paged_pallas_gpu.py``
(flash-decoding: context splits per (sequence, KV head), merged by ``merge_attention``) and
``paged_pallas_tpu.py`` (Mosaic: the page table is scalar-prefetched so each grid step's BlockSpecs
fetch the sequence's physical pages; what ``pallas`` and ``auto`` run on a TPU).

``ragged_paged_attention`` (a serving step's prefill chunks and decodes in one call, vLLM's
"unified attention") has ``ragged_reference.py`` (one decode per token), ``ragged_xla.py`` (query
blocks walk their sequence's pages in lockstep, online softmax), ``ragged_pallas_gpu.py`` (one
Triton program per query block and KV head) and ``ragged_pallas_tpu.py`` (Mosaic: the decode
kernel's grid over query blocks, with a causal key limit per query row; what ``pallas`` and
``auto`` run on a TPU); ``ragged_blocks.py`` holds the block layout they share.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels_pallas.attention import (checks, paged_pallas_gpu, paged_pallas_tpu, paged_xla,
                                      pallas_gpu, pallas_mgpu, pallas_mgpu_bwd, pallas_tpu,
                                      ragged_blocks, ragged_pallas_gpu, ragged_pallas_tpu,
                                      ragged_reference, ragged_xla, reference, tiling, xla)
from kernels_pallas.attention.checks import BACKENDS  # every op takes these (flash: +pallas_mgpu)
from kernels_pallas.attention.merge import merge_attention
from kernels_pallas.attention.ragged_blocks import token_owners
from kernels_pallas.attention.sparsity import tile_fraction
from kernels_pallas.attention.tiling import (DEFAULT_BLOCK_SIZES, MASK_VALUE, BlockSizes,
                                             MaskSpec, default_block_sizes, dequantize)
from kernels_pallas.backend import resolve_backend
from kernels_pallas.validation import check_block

# MASK_VALUE, dequantize and token_owners are the kernels' conventions that callers attending
# over the same caches reuse: the masked-score constant, int8 K/V dequantization and a ragged
# step's token -> (sequence, index, position) map.
__all__ = ["flash_attention", "paged_decode_attention", "ragged_paged_attention",
           "merge_attention", "tile_fraction", "BlockSizes", "DEFAULT_BLOCK_SIZES",
           "MASK_VALUE", "dequantize", "token_owners"]


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
                    local_window: int | tuple[int, int] | None = None,
                    softmax_scale: float | None = None, logit_softcap: float | None = None,
                    return_lse: bool = False, backend: str = "auto", block_q: int | None = None,
                    block_k: int | None = None, block_sizes: BlockSizes | None = None,
                    ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Exact softmax attention with memory linear in sequence length.

    Args:
      q: [batch, T, Hq, D]. k, v: [batch, S, Hkv, D], Hq % Hkv == 0 (GQA/MQA; K/V are never
        repeated). One dtype for all three: float32, bfloat16 or float16; softmax statistics and
        accumulators are float32.
      causal: T == S, or T < S with the queries being the LAST T of the S positions (query row r
        sits at position r + S - T), so the causal mask aligns bottom-right as chunked prefill
        needs: key j is visible to row r iff j <= r + S - T.
      segment_ids: int [batch, S] (ids of all S positions; the queries take the last T), or a pair
        (q_ids [batch, T], kv_ids [batch, S]). A query sees only keys with its own id. Ids are
        compared as int32: wider ids outside its range raise ValueError (when concrete).
      local_window: (left, right) or an int w meaning (w, w), as in
        ``jax.nn.dot_product_attention``'s ``local_window_size``: the query at position p sees keys
        p - left .. p + right. Combined with ``causal`` the right side is 0 in effect. Sides are
        ints >= 0; a side >= S is unbounded (any large int, e.g. sys.maxsize, will do).
      softmax_scale: multiplies q·k; default 1/sqrt(D).
      logit_softcap: scores become cap * tanh(scores / cap) (after scaling), as in Gemma 2.
      return_lse: also return the float32 log-sum-exp of the (scaled, capped) scores
        [batch, T, Hq]; gradients flow through it too (``merge_attention``, ring attention).
      backend: "reference" | "xla" | "pallas" | "pallas_tpu" | "pallas_mgpu" | "auto" (pallas on
        GPU and TPU, xla on CPU). "pallas_mgpu" is the Mosaic GPU forward for Hopper (Triton
        backward, or Mosaic GPU with block_sizes.mgpu_backward="mosaic"): bfloat16/float16
        only (float32 is refused, not cast: wgmma takes 16-bit inputs), D <= 128, no
        segment_ids (ValueError).
      block_q, block_k: tile sizes (forward and backward); None takes the backend's defaults
        from ``DEFAULT_BLOCK_SIZES``. pallas (Triton) needs powers of two >= 16, pallas_tpu
        multiples of 8 (128 suits the MXU); pallas_mgpu's forward
        takes 64 or 128 (its block_sizes.num_stages and num_consumers set the K/V pipeline depth
        and the warpgroups per program).
      block_sizes: a whole ``BlockSizes`` (every kernel's tiles and Triton's warps and stages)
        in place of the backend's default; block_q / block_k still override its tiles. xla and
        pallas_tpu read only block_q and block_k (their backward passes reuse the forward tiles):
        the *_bwd, *_dq, warp, stage and consumer fields are ignored there.

    Returns:
      out [batch, T, Hq, D] in q's dtype, and with ``return_lse`` also lse float32 [batch, T, Hq].
      A query row that sees no key at all (only possible through segment ids) gets out = 0 and
      lse = -inf, and zero gradients.
    """
    checks.check_qkv(q, k, v)
    checks.check_scalars(causal, softmax_scale, logit_softcap, return_lse, backend,
                         backends=checks.FLASH_BACKENDS)
    causal, return_lse = bool(causal), bool(return_lse)  # numpy bools too; MaskSpec is static
    batch, t, _, d = q.shape
    s = k.shape[1]
    window = checks.check_window(local_window, s)
    q_ids, kv_ids = checks.check_segment_ids(segment_ids, batch, t, s)
    impl, interpret = resolve_backend(backend, tpu_kernel=True)
    # Triton tiles are powers of two >= 16; the TPU kernel's are multiples of 8 (Mosaic rows)
    pallas, tpu = impl.startswith("pallas"), impl == "pallas_tpu"
    check_block("block_q", block_q, pallas=pallas and not tpu, minimum=16, tpu=tpu)
    check_block("block_k", block_k, pallas=pallas and not tpu, minimum=16, tpu=tpu)
    checks.check_block_sizes(block_sizes, pallas=pallas, tpu=tpu)
    scale = float(d ** -0.5 if softmax_scale is None else softmax_scale)
    softcap = None if logit_softcap is None else float(logit_softcap)
    spec = MaskSpec(t, s, causal, window, q_ids is not None)

    if impl == "reference":
        out, lse = reference.attention(q, k, v, causal=causal, q_segment_ids=q_ids,
                                       kv_segment_ids=kv_ids, local_window=window,
                                       softmax_scale=scale, logit_softcap=softcap)
        out = out.astype(q.dtype)
    else:
        blocks = block_sizes or default_block_sizes(impl, d)
        if block_q is not None:
            blocks = dataclasses.replace(blocks, block_q=block_q, block_q_bwd=block_q,
                                         block_q_dq=block_q)
        if block_k is not None:
            blocks = dataclasses.replace(blocks, block_k=block_k, block_k_bwd=block_k,
                                         block_k_dq=block_k)
        if impl == "pallas_mgpu":
            checks.check_mgpu(q, segments=q_ids is not None, blocks=blocks)
            # the same forward either way; the VJP runs the Triton or the Mosaic GPU backward
            mgpu = pallas_mgpu_bwd if blocks.mgpu_backward == "mosaic" else pallas_mgpu
            out, lse = mgpu.flash_attention(q, k, v, spec=spec, scale=scale, softcap=softcap,
                                            blocks=blocks, interpret=interpret)
        elif impl == "xla":
            out, lse = xla.flash_attention(q, k, v, q_ids, kv_ids, spec=spec, scale=scale,
                                           softcap=softcap, block_q=blocks.block_q,
                                           block_k=blocks.block_k)
        elif impl == "pallas_tpu":
            out, lse = pallas_tpu.flash_attention(q, k, v, q_ids, kv_ids, spec=spec, scale=scale,
                                                  softcap=softcap, block_q=blocks.block_q,
                                                  block_k=blocks.block_k, interpret=interpret)
        else:
            out, lse = pallas_gpu.flash_attention(q, k, v, q_ids, kv_ids, spec=spec, scale=scale,
                                                  softcap=softcap, blocks=blocks,
                                                  interpret=interpret)
    return (out, lse) if return_lse else out


def _paged_impl(backend: str, page_size: int) -> tuple[str, bool]:
    """(implementation, interpret) of the paged and ragged ops: the Triton kernels need a
    power-of-two page_size, so "auto" falls back to xla where it is not and an explicit
    "pallas" raises."""
    impl, interpret = resolve_backend(backend, tpu_kernel=True)
    if impl == "pallas" and page_size & (page_size - 1):
        if backend == "auto":
            return "xla", interpret  # auto picks what runs
        raise ValueError(f"the Pallas backend needs a power-of-two page_size (Triton tiles); "
                         f"got page_size={page_size}; use backend='xla'")
    return impl, interpret


def _paged_window(local_window, capacity: int) -> int | None:
    """The checked left window of the paged ops; None where it reaches back past every key a
    table row holds (so the kernels skip the mask): ``checks.bound_window``, as flash_attention's."""
    return checks.check_paged_window(local_window, capacity)


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           page_table: jax.Array, lengths: jax.Array, *,
                           softmax_scale: float | None = None, backend: str = "auto",
                           num_splits: int | None = None, pages_per_block: int | None = None,
                           return_lse: bool = False, k_scales: jax.Array | None = None,
                           v_scales: jax.Array | None = None, local_window: int | None = None,
                           xla_chunk_tokens: int | None = None,
                           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention of one new query token per sequence over a KV cache kept in fixed-size pages.

    Args:
      q: [batch, Hq, D], the query of each sequence's newest token.
      k_pages, v_pages: [num_pages, page_size, Hkv, D] (vLLM's layout), Hq % Hkv == 0; same dtype
        as q (float32, bfloat16 or float16), or int8 with ``k_scales``/``v_scales``. Softmax
        statistics and accumulators are float32.
      page_table: int [batch, pages_per_seq]: token p of sequence b lives in page
        ``page_table[b, p // page_size]`` at slot ``p % page_size``. Entries past a sequence's
        length may still be gathered (the kernels read whole blocks of pages) but never count:
        any value in range will do, and the slots a sequence does not use (past its length,
        pages only a length-0 sequence points at) may hold anything, NaN and Inf included
        (their scores are masked and their V rows zeroed before P @ V). Ids are clamped into
        [0, num_pages) first: one a traced call cannot check reads a wrong page, never memory
        outside the pool (the GPU and TPU kernels index pages without bounds checks).
      lengths: int [batch], valid tokens per sequence, 0 <= lengths <= pages_per_seq * page_size.
        A sequence of length 0 gets out = 0 (and lse = -inf).
      softmax_scale: multiplies q·k; default 1/sqrt(D).
      backend: "reference" | "xla" | "pallas" | "pallas_tpu" | "auto". "pallas" is the
        platform's kernel (Triton on GPU, Mosaic on TPU, the Triton kernel interpreted on CPU);
        "pallas_tpu" forces the Mosaic kernel (interpreted off a TPU). "auto": the TPU kernel on a
        TPU (any page_size), the Triton kernel on a GPU where page_size is a power of two (which
        it needs), xla otherwise.
      num_splits: GPU pallas only: context splits per (sequence, KV head) (flash-decoding) of
        the pages a query sees: the table row, or with ``local_window`` the window's pages (each
        sequence's splits start where its window does); None picks enough to fill the GPU
        (``paged_pallas_gpu.default_num_splits``). The TPU kernel walks each sequence's pages in
        order (its grid is sequential) and ignores it.
      pages_per_block: pages gathered per loop step; None gives ~512 tokens a step on xla (or
        ``xla_chunk_tokens``), ~64 on GPU pallas (raised there to a power of two covering >= 16
        tokens) and ~256 on pallas_tpu (at most 16 pages, one BlockSpec per page: larger values
        are clipped to 16).
      return_lse: also return the float32 log-sum-exp [batch, Hq] (to merge with other parts).
      k_scales, v_scales: float32 [num_pages, page_size, Hkv], only with int8 pages: the page
        holds values whose K (V) is ``values * scale`` per (token, head). Each backend dequantizes
        the pages it gathers (in the kernel on pallas), so HBM traffic is the int8 pages.
      local_window: None (every key), or an int w >= 0: the query, at position length - 1, sees
        keys length - 1 - w .. length - 1 only (a sliding window: ``flash_attention``'s causal
        ``local_window=w``, left w; HF Mistral's ``sliding_window`` W is w = W - 1). The Pallas
        kernels walk each sequence's pages from its window's first page (the GPU kernel's splits
        cut the window's pages, not the table's); xla skips the chunks before every sequence's
        window.
      xla_chunk_tokens: where the xla path runs and ``pages_per_block`` is None, the context
        tokens it gathers per loop step in place of its ~512 (``paged_xla.DEFAULT_CHUNK_TOKENS``).
        A caller whose batch rows are many tokens of the same few sequences (a serving step's
        one decode per token) passes fewer, keeping each row's gather near its real context. The
        reference and the Pallas kernels ignore it.

    Returns:
      out [batch, Hq, D] in q's dtype (and lse float32 [batch, Hq] with ``return_lse``).
      Decode only: no gradients are defined through the xla and pallas paths.

    The page table's and lengths' ranges are validated when they are concrete (not under jit);
    traced lengths are clipped to [0, pages_per_seq * page_size], so that a bad one cannot make a
    kernel read past the page table (a windowed walk starts at the window's page).
    """
    checks.check_paged(q, k_pages, v_pages, page_table, lengths, k_scales, v_scales)
    checks.check_scalars(False, softmax_scale, None, return_lse, backend)
    page_size = k_pages.shape[1]
    window = _paged_window(local_window, page_table.shape[1] * page_size)
    for name, value in (("num_splits", num_splits), ("pages_per_block", pages_per_block),
                        ("xla_chunk_tokens", xla_chunk_tokens)):
        check_block(name, value, pallas=False, minimum=1)
    impl, interpret = _paged_impl(backend, page_size)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    page_table = tiling.pool_page_ids(page_table, k_pages)
    lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, page_table.shape[1] * page_size)
    if impl == "reference":
        out, lse = reference.paged_decode_attention(
            q, tiling.dequantize(k_pages, k_scales, q.dtype),
            tiling.dequantize(v_pages, v_scales, q.dtype), page_table, lengths,
            softmax_scale=scale, local_window=window)
        out = out.astype(q.dtype)
    elif impl == "xla":
        if pages_per_block is None:
            pages_per_block = paged_xla.default_pages_per_block(
                page_size, page_table.shape[1], xla_chunk_tokens or paged_xla.DEFAULT_CHUNK_TOKENS)
        out, lse = paged_xla.paged_decode_attention(q, k_pages, v_pages, page_table, lengths,
                                                    scale=scale, pages_per_block=pages_per_block,
                                                    k_scales=k_scales, v_scales=v_scales,
                                                    local_window=window)
    elif impl == "pallas_tpu":
        out, lse = paged_pallas_tpu.paged_decode_attention(
            q, k_pages, v_pages, page_table, lengths, scale=scale,
            pages_per_block=pages_per_block, interpret=interpret, k_scales=k_scales,
            v_scales=v_scales, local_window=window)
    else:
        if num_splits is None:
            num_splits = paged_pallas_gpu.default_num_splits(
                q.shape[0], k_pages.shape[2],
                tiling.span_pages(page_table.shape[1], page_size, window))
        out, lse = paged_pallas_gpu.paged_decode_attention(
            q, k_pages, v_pages, page_table, lengths, scale=scale, num_splits=num_splits,
            pages_per_block=pages_per_block, interpret=interpret, k_scales=k_scales,
            v_scales=v_scales, local_window=window)
    return (out, lse) if return_lse else out


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           page_table: jax.Array, query_starts: jax.Array,
                           kv_lengths: jax.Array, *, num_seqs: int | jax.Array | None = None,
                           softmax_scale: float | None = None, backend: str = "auto",
                           return_lse: bool = False, k_scales: jax.Array | None = None,
                           v_scales: jax.Array | None = None, block_q: int | None = None,
                           pages_per_block: int | None = None, local_window: int | None = None,
                           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Causal attention of a serving step's query tokens, prefill chunks and decodes alike, each
    over its own sequence's KV pages; a sequence's pages are read once per query block, not once
    per token.

    Args:
      q: [T, Hq, D], the step's query tokens: each sequence's tokens contiguous and in position
        order.
      k_pages, v_pages: [num_pages, page_size, Hkv, D], Hq % Hkv == 0; q's dtype (float32,
        bfloat16 or float16), or int8 with ``k_scales``/``v_scales`` float32 [num_pages, page_size,
        Hkv] (as in ``paged_decode_attention``). Softmax statistics and accumulators are float32.
      page_table: int [S, pages_per_seq]: token p of sequence s lives in page
        ``page_table[s, p // page_size]`` at slot ``p % page_size``. As in
        ``paged_decode_attention``, entries past a sequence's kv_length may be anything in range
        and the slots past it may hold anything, NaN and Inf included.
      query_starts: int [S + 1] (cu_q_lens): sequence s owns q's tokens
        ``query_starts[s] : query_starts[s + 1]``, q_len_s of them (0 allowed).
      kv_lengths: int [S]: tokens cached for each sequence, this step's tokens included (their K/V
        already written), q_len_s <= kv_lengths[s] <= pages_per_seq * page_size. Query i of
        sequence s sits at position kv_lengths[s] - q_len_s + i and sees keys 0 .. that position
        (causal, bottom-right aligned: a chunk may start mid-context).
      num_seqs: None (all S sequences are real) or an int32 scalar, traced or not: only the first
        num_seqs sequences are real, so shapes stay fixed under jit; the entries of the others are
        ignored. Tokens owned by no real sequence (padding) get out 0 and lse -inf.
      softmax_scale: multiplies q·k; default 1/sqrt(D).
      backend: "reference" | "xla" | "pallas" | "pallas_tpu" | "auto". "pallas" is the
        platform's kernel (Triton on GPU, Mosaic on TPU, the Triton kernel interpreted on CPU);
        "pallas_tpu" forces the Mosaic kernel (interpreted off a TPU). "auto": the TPU kernel on
        a TPU (any page_size), the Triton kernel on a GPU where page_size is a power of two,
        xla otherwise.
      return_lse: also return the float32 log-sum-exp [T, Hq] (to merge with other parts).
      block_q: query tokens per block (per Triton program on pallas, where it must be a power of
        two and is raised until block_q x the query group padded to a power of two reaches 16
        rows; per grid row of the TPU kernel on pallas_tpu, any size); None:
        ``ragged_blocks.default_block_q``.
      pages_per_block: pages gathered per loop step; None gives ~128 tokens on xla, ~64 on
        pallas (raised there to a power of two covering >= 16 tokens) and ~256 on pallas_tpu (at
        most 16 pages, one BlockSpec per page: larger values are clipped to 16).
      local_window: None (causal over every key), or an int w >= 0: the query at position p sees
        keys p - w .. p only (a sliding window, as in ``paged_decode_attention``; HF Mistral's
        ``sliding_window`` W is w = W - 1). The Pallas kernels walk each query block's pages
        from its first query's window; xla skips the chunks before every block's window.

    Returns:
      out [T, Hq, D] in q's dtype (and lse float32 [T, Hq] with ``return_lse``). No gradients are
      defined through the xla and pallas paths.

    query_starts, kv_lengths, num_seqs and the page table are validated when concrete (not under
    jit): query_starts[:num_seqs + 1] non-decreasing within [0, T], q_len <= kv_lengths <=
    capacity for the real sequences, page ids in range in the real sequences' rows (with a traced
    num_seqs no row is known to be real, so a concrete table goes unchecked). Traced kv_lengths
    are clipped to [0, capacity], so that a bad one cannot make a kernel read past the table.
    """
    checks.check_ragged(q, k_pages, v_pages, page_table, query_starts, kv_lengths, num_seqs,
                        k_scales, v_scales)
    checks.check_scalars(False, softmax_scale, None, return_lse, backend)
    page_size = k_pages.shape[1]
    window = _paged_window(local_window, page_table.shape[1] * page_size)
    impl, interpret = _paged_impl(backend, page_size)
    check_block("block_q", block_q, pallas=impl == "pallas", minimum=1)
    check_block("pages_per_block", pages_per_block, pallas=False, minimum=1)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    page_table = tiling.pool_page_ids(page_table, k_pages)
    query_starts = jnp.asarray(query_starts, jnp.int32)
    kv_lengths = jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, page_table.shape[1] * page_size)
    num_seqs = None if num_seqs is None else jnp.asarray(num_seqs, jnp.int32)
    if impl == "reference":
        out, lse = ragged_reference.ragged_paged_attention(
            q, tiling.dequantize(k_pages, k_scales, q.dtype),
            tiling.dequantize(v_pages, v_scales, q.dtype), page_table, query_starts, kv_lengths,
            num_seqs, softmax_scale=scale, local_window=window)
        out = out.astype(q.dtype)
        return (out, lse) if return_lse else out
    groups = q.shape[1] // k_pages.shape[2]
    block_q = block_q or ragged_blocks.default_block_q(impl, groups)
    pages_per_seq = page_table.shape[1]
    if impl == "pallas":
        block_q = ragged_pallas_gpu.kernel_block_q(block_q, groups)
    layout = ragged_blocks.ragged_layout(query_starts, kv_lengths, num_seqs, q.shape[0], block_q)
    if impl == "xla":
        out, lse = ragged_xla.ragged_paged_attention(
            q, k_pages, v_pages, page_table, layout, scale=scale, block_q=block_q,
            pages_per_block=pages_per_block or ragged_blocks.default_pages_per_block_xla(
                page_size, pages_per_seq),
            k_scales=k_scales, v_scales=v_scales, local_window=window)
    elif impl == "pallas_tpu":
        out, lse = ragged_pallas_tpu.ragged_paged_attention(
            q, k_pages, v_pages, page_table, layout, scale=scale, block_q=block_q,
            pages_per_block=pages_per_block, interpret=interpret, k_scales=k_scales,
            v_scales=v_scales, local_window=window)
    else:
        out, lse = ragged_pallas_gpu.ragged_paged_attention(
            q, k_pages, v_pages, page_table, layout, scale=scale, block_q=block_q,
            pages_per_block=pages_per_block or paged_pallas_gpu.default_pages_per_block(
                page_size, pages_per_seq),
            interpret=interpret, k_scales=k_scales, v_scales=v_scales, local_window=window)
    return (out, lse) if return_lse else out
