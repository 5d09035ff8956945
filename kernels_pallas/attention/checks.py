"""Validation of flash_attention's, paged_decode_attention's, ragged_paged_attention's,
merge_attention's and tile_fraction's arguments at the API: one ValueError/TypeError per mistake.
The checks every op shares (arrays, float dtypes, block sizes) live in
``kernels_pallas/validation.py``."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.attention.tiling import BlockSizes
from kernels_pallas.validation import (check_arrays, check_block, check_float_dtype, is_int,
                                       shape_str)

# every attention op has a TPU (Mosaic) kernel besides the Triton one
BACKENDS = ("auto", "reference", "xla", "pallas", "pallas_tpu")
# flash_attention alone also has a Mosaic GPU (Hopper) forward
FLASH_BACKENDS = BACKENDS + ("pallas_mgpu",)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_qkv(q, k, v) -> None:
    check_arrays(q=q, k=k, v=v)
    if q.ndim != 4:
        raise ValueError(f"q must have rank 4 [batch, T, Hq, D]; got q {shape_str(q)}")
    if k.ndim != 4:
        raise ValueError(f"k must have rank 4 [batch, S, Hkv, D]; got k {shape_str(k)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; "
                         f"got k {shape_str(k)} and v {shape_str(v)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size; "
                         f"got q {shape_str(q)} and k {shape_str(k)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim D; "
                         f"got q {shape_str(q)} and k {shape_str(k)}")
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"q and k must have no empty axis; "
                         f"got q {shape_str(q)} and k {shape_str(k)}")
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv:
        raise ValueError(f"the number of query heads must be a multiple of the number of KV heads "
                         f"(Hq % Hkv == 0); got Hq={hq}, Hkv={hkv}")
    t, s = q.shape[1], k.shape[1]
    if t > s:
        raise ValueError(f"q may not be longer than k (T <= S: the queries are the last T of the S "
                         f"positions); got T={t}, S={s}")
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1:
        raise ValueError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    check_float_dtype("q, k and v", q)


def check_segment_ids(segment_ids, batch: int, t: int, s: int):
    """-> (q_ids int32 [batch, T], kv_ids int32 [batch, S]) or (None, None)."""
    if segment_ids is None:
        return None, None
    single = not isinstance(segment_ids, (tuple, list))
    if single:
        q_ids = kv_ids = segment_ids
        expected = (("segment_ids", segment_ids, (batch, s), "[batch, S]"),)
    else:
        if len(segment_ids) != 2:
            raise ValueError(f"segment_ids must be an array [batch, S] or a pair "
                             f"(q_ids [batch, T], kv_ids [batch, S]); "
                             f"got a sequence of {len(segment_ids)}")
        q_ids, kv_ids = segment_ids
        expected = (("segment_ids[0] (q_ids)", q_ids, (batch, t), "[batch, T]"),
                    ("segment_ids[1] (kv_ids)", kv_ids, (batch, s), "[batch, S]"))
    for name, ids, shape, label in expected:
        if not (hasattr(ids, "shape") and hasattr(ids, "dtype")):
            raise TypeError(f"{name} must be an integer array; got {type(ids).__name__}")
        if tuple(ids.shape) != shape:
            raise ValueError(f"{name} must have shape {label} = [{shape[0]}, {shape[1]}]; "
                             f"got {shape_str(ids)}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must have an integer dtype; got {ids.dtype}")
        _check_int32_ids(name, ids)
    kv_ids = jnp.asarray(kv_ids, jnp.int32)
    # One array covers all S positions; the queries are the last T of them.
    q_ids = kv_ids[:, s - t:] if single else jnp.asarray(q_ids, jnp.int32)
    return q_ids, kv_ids


def _check_int32_ids(name: str, ids) -> None:
    """The kernels compare ids as int32: wider ids (int64, uint32) must hold int32 values, or the
    cast would wrap distinct ids into one (2**32 into 0). Checked when concrete; traced ids are
    trusted."""
    i32 = jnp.iinfo(jnp.int32)
    info = jnp.iinfo(ids.dtype)
    if (i32.min <= info.min and info.max <= i32.max) or not _concrete(ids) or not ids.size:
        return
    x = np.asarray(ids)
    if x.min() < i32.min or x.max() > i32.max:
        raise ValueError(f"{name} must hold int32 values [{i32.min}, {i32.max}] (the kernels "
                         f"compare ids as int32); got {ids.dtype} values in [{x.min()}, "
                         f"{x.max()}]")


def check_window(local_window, length: int) -> tuple[int, int] | None:
    """flash_attention's window -> (left, right) bounded by ``length`` (the key length S), or
    None. Sides are ints >= 0; a side >= S reaches past every key, i.e. is unbounded."""
    if local_window is None:
        return None
    if is_int(local_window):
        local_window = (local_window, local_window)
    if (not isinstance(local_window, (tuple, list)) or len(local_window) != 2
            or not all(is_int(w) and w >= 0 for w in local_window)):
        raise ValueError(f"local_window must be None, an int >= 0 or a pair (left, right) of ints "
                         f">= 0; got {local_window!r}")
    return bound_window((int(local_window[0]), int(local_window[1])), length)


def check_paged_window(local_window, capacity: int) -> int | None:
    """The paged ops' left window (flash_attention's causal window, whose right side causality
    makes 0) bounded by ``capacity`` (a table row's tokens): None or an int >= 0."""
    if local_window is None:
        return None
    if not is_int(local_window) or local_window < 0:
        raise ValueError(f"local_window must be None or an int >= 0 (the keys a query sees before "
                         f"its own position); got {local_window!r}")
    bounded = bound_window((int(local_window),), capacity)
    return None if bounded is None else bounded[0]


def bound_window(sides: tuple[int, ...], length: int) -> tuple[int, ...] | None:
    """Checked window sides against the ``length`` keys they can reach: a side >= length reaches
    past every key, so it is clamped to length (the masks compute position +- side in int32, where
    a side near 2**31 wrapped and hid every key); a window unbounded on every side is None, so the
    kernels skip its mask."""
    if all(w >= length for w in sides):
        return None
    return tuple(min(w, length) for w in sides)


def check_scalars(causal, softmax_scale, logit_softcap, return_lse, backend,
                  backends: tuple[str, ...] = BACKENDS) -> None:
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool; got {causal!r}")
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool; got {return_lse!r}")
    if softmax_scale is not None and not (_is_real(softmax_scale) and softmax_scale != 0
                                          and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be None or a finite, nonzero Python number; "
                         f"got {softmax_scale!r}")
    if logit_softcap is not None and not (_is_real(logit_softcap) and 0 < logit_softcap
                                          and math.isfinite(logit_softcap)):
        raise ValueError(f"logit_softcap must be None or a finite Python number > 0; "
                         f"got {logit_softcap!r}")
    if backend not in backends:
        raise ValueError(f"backend must be one of {backends}; got {backend!r}")


def check_mgpu(q, *, segments: bool, blocks: BlockSizes) -> None:
    """What the Mosaic GPU forward (``pallas_mgpu.py``) takes beyond flash_attention's rules:
    16-bit inputs (wgmma), D <= 128, no segment ids (not implemented there),
    block_q 64 or 128, block_k 64 or 128, num_stages >= 1 and num_consumers 1 or 2; the backward
    "triton" or "mosaic", whose tiles (block_*_bwd, block_*_dq) are 64 or 128."""
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"backend='pallas_mgpu' needs bfloat16 or float16 q, k, v (wgmma takes "
                         f"16-bit inputs); got {q.dtype}; cast them, or use backend='pallas'")
    if q.shape[3] > 128:
        raise ValueError(f"backend='pallas_mgpu' supports head dims up to 128; got D={q.shape[3]}; "
                         f"use backend='pallas'")
    if segments:
        raise ValueError("backend='pallas_mgpu' does not support segment_ids; use "
                         "backend='pallas' (Triton) or 'xla'")
    if blocks.block_q not in (64, 128):
        raise ValueError(f"block_q must be 64 or 128 for backend='pallas_mgpu' (wgmma rows of one "
                         f"warpgroup); got {blocks.block_q}")
    if blocks.block_k not in (64, 128):
        raise ValueError(f"block_k must be 64 or 128 for backend='pallas_mgpu' (128-byte swizzled "
                         f"K^T tiles); got {blocks.block_k}")
    if not is_int(blocks.num_stages) or blocks.num_stages < 1:
        raise ValueError(f"block_sizes.num_stages must be a positive int for "
                         f"backend='pallas_mgpu'; got {blocks.num_stages!r}")
    if blocks.num_consumers not in (1, 2):
        raise ValueError(f"block_sizes.num_consumers must be 1 or 2 for backend='pallas_mgpu' "
                         f"(compute warpgroups per program); got {blocks.num_consumers!r}")
    if blocks.mgpu_backward not in ("triton", "mosaic"):
        raise ValueError(f"block_sizes.mgpu_backward must be 'triton' or 'mosaic'; got "
                         f"{blocks.mgpu_backward!r}")
    if blocks.mgpu_backward == "mosaic":
        tiles = dict(block_q_bwd=blocks.block_q_bwd, block_k_bwd=blocks.block_k_bwd,
                     block_q_dq=blocks.dq[0], block_k_dq=blocks.dq[1])
        for name, value in tiles.items():
            if value not in (64, 128):
                raise ValueError(f"block_sizes.{name} must be 64 or 128 for the Mosaic GPU "
                                 f"backward (wgmma rows, 128-byte swizzled tiles); got {value}")
        if blocks.num_consumers_bwd not in (1, 2):
            raise ValueError(f"block_sizes.num_consumers_bwd must be 1 or 2 for the Mosaic GPU "
                             f"backward (compute warpgroups per program); got "
                             f"{blocks.num_consumers_bwd!r}")


def check_block_sizes(blocks, *, pallas: bool, tpu: bool = False) -> None:
    """A user's ``BlockSizes``: every tile a valid block for the backend, launch settings >= 1.
    With ``tpu`` (the Mosaic kernels, which read only block_q and block_k) those two are
    multiples of 8 and the rest need only be positive; with ``pallas`` (Triton) every tile is a
    power of two >= 16."""
    if blocks is None:
        return
    if not isinstance(blocks, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes or None; got {type(blocks).__name__}")
    for field in dataclasses.fields(blocks):
        if field.name == "mgpu_backward":  # a kernel choice, checked by check_mgpu
            continue
        value = getattr(blocks, field.name)
        tile = field.name.startswith("block")
        check_block(f"block_sizes.{field.name}", value, pallas=pallas and tile and not tpu,
                    minimum=16 if tile else 1,
                    tpu=tpu and field.name in ("block_q", "block_k"))


def check_merge(o1, lse1, o2, lse2) -> None:
    """merge_attention's parts: o1, o2 float [..., D] of one shape, lse1, lse2 float [...] =
    o.shape[:-1]. Any leading axes are allowed ([batch, T, H, D] from flash_attention, [batch, H,
    D] from decode); the dtypes may differ between the parts (a float32 accumulator and a bf16
    part)."""
    check_arrays(o1=o1, lse1=lse1, o2=o2, lse2=lse2)
    if o1.ndim < 1 or o1.shape != o2.shape:
        raise ValueError(f"o1 and o2 must have the same shape [..., D]; "
                         f"got o1 {shape_str(o1)} and o2 {shape_str(o2)}")
    for name, lse in (("lse1", lse1), ("lse2", lse2)):
        if lse.shape != o1.shape[:-1]:
            expected = ", ".join(str(n) for n in o1.shape[:-1])
            raise ValueError(f"{name} must have shape o1.shape[:-1] = [{expected}]; "
                             f"got {name} {shape_str(lse)}")
    for name, x in (("o1", o1), ("lse1", lse1), ("o2", o2), ("lse2", lse2)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype; got {x.dtype}")


def check_tile_fraction(t, s, causal, local_window, segment_ids, block_q, block_k,
                        head_dim=None):
    """tile_fraction's arguments -> (window (left, right) or None, q_ids int32 [batch, T] and
    kv_ids int32 [batch, S], or None, None), with flash_attention's rules for T, S, the window and
    the segment ids; any positive block size counts (the XLA path's tiles need not be powers of
    two)."""
    for name, n in (("t", t), ("s", s)):
        if not is_int(n) or n < 1:
            raise ValueError(f"{name} must be a positive int; got {n!r}")
    if t > s:
        raise ValueError(f"t may not exceed s (T <= S: the queries are the last T of the S "
                         f"positions); got t={t}, s={s}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool; got {causal!r}")
    check_block("block_q", block_q, pallas=False, minimum=1)
    check_block("block_k", block_k, pallas=False, minimum=1)
    check_block("head_dim", head_dim, pallas=False, minimum=1)
    window = check_window(local_window, s)
    # The batch is the ids' own: kv_ids [batch, S] (the pair's second entry or the one array).
    pair = isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2
    kv = segment_ids[1] if pair else segment_ids
    if hasattr(kv, "shape") and len(kv.shape) != 2:
        name = "segment_ids[1] (kv_ids)" if pair else "segment_ids"
        raise ValueError(f"{name} must be 2-D [batch, S] = [batch, {s}]; got shape "
                         f"{shape_str(kv)}")
    batch = kv.shape[0] if hasattr(kv, "shape") else 1
    q_ids, kv_ids = check_segment_ids(segment_ids, batch, t, s)
    return window, q_ids, kv_ids


def check_paged(q, k_pages, v_pages, page_table, lengths, k_scales=None, v_scales=None) -> None:
    """paged_decode_attention's arrays: ranks, shapes, dtypes and (when concrete) index ranges."""
    check_arrays(q=q, k_pages=k_pages, v_pages=v_pages, page_table=page_table, lengths=lengths)
    if q.ndim != 3:
        raise ValueError(f"q must have rank 3 [batch, Hq, D] (one query token per sequence); "
                         f"got q {shape_str(q)}")
    _check_pages(q, k_pages, v_pages, k_scales, v_scales)
    batch = q.shape[0]
    if page_table.ndim != 2 or page_table.shape[0] != batch or page_table.shape[1] < 1:
        raise ValueError(f"page_table must have shape [batch, pages_per_seq] with batch={batch} "
                         f"and pages_per_seq >= 1; got {shape_str(page_table)}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [batch] = [{batch}]; got {shape_str(lengths)}")
    _check_integer(page_table=page_table, lengths=lengths)
    _check_table_values(page_table, k_pages.shape[0])
    capacity = page_table.shape[1] * k_pages.shape[1]
    if _concrete(lengths):
        ln = np.asarray(lengths)
        if ln.min() < 0 or ln.max() > capacity:
            raise ValueError(f"lengths must lie in [0, pages_per_seq * page_size] = "
                             f"[0, {capacity}]; got values in [{ln.min()}, {ln.max()}]")


def check_ragged(q, k_pages, v_pages, page_table, query_starts, kv_lengths, num_seqs,
                 k_scales=None, v_scales=None) -> None:
    """ragged_paged_attention's arrays: ranks, shapes, dtypes and, where concrete, the layout:
    query_starts sorted within [0, T], kv_lengths within [q_len, capacity] for real sequences."""
    check_arrays(q=q, k_pages=k_pages, v_pages=v_pages, page_table=page_table,
                  query_starts=query_starts, kv_lengths=kv_lengths)
    if q.ndim != 3:
        raise ValueError(f"q must have rank 3 [T, Hq, D] (the step's query tokens); "
                         f"got q {shape_str(q)}")
    _check_pages(q, k_pages, v_pages, k_scales, v_scales)
    if query_starts.ndim != 1 or query_starts.shape[0] < 2:
        raise ValueError(f"query_starts must have shape [S + 1] with S >= 1 sequences; "
                         f"got {shape_str(query_starts)}")
    s = query_starts.shape[0] - 1
    if page_table.ndim != 2 or page_table.shape[0] != s or page_table.shape[1] < 1:
        raise ValueError(f"page_table must have shape [S, pages_per_seq] with S={s} (from "
                         f"query_starts [S + 1]) and pages_per_seq >= 1; "
                         f"got {shape_str(page_table)}")
    if kv_lengths.shape != (s,):
        raise ValueError(f"kv_lengths must have shape [S] = [{s}]; got {shape_str(kv_lengths)}")
    _check_integer(page_table=page_table, query_starts=query_starts, kv_lengths=kv_lengths)
    if num_seqs is not None:
        if not (is_int(num_seqs) or (hasattr(num_seqs, "dtype") and num_seqs.shape == ()
                                      and jnp.issubdtype(num_seqs.dtype, jnp.integer))):
            raise ValueError(f"num_seqs must be None, an int or an integer scalar array; "
                             f"got {num_seqs!r}")
        if _concrete(num_seqs) and not 0 <= int(num_seqs) <= s:
            raise ValueError(f"num_seqs must lie in [0, S] = [0, {s}]; got {int(num_seqs)}")
    # The rows of sequences past num_seqs are never read, so they may hold anything; a traced
    # num_seqs leaves no row known to be real, so then none is checked.
    if num_seqs is None:
        real_rows = page_table
    elif _concrete(num_seqs):
        real_rows = page_table[:int(num_seqs)]
    else:
        real_rows = page_table[:0]
    _check_table_values(real_rows, k_pages.shape[0])
    if not (_concrete(query_starts) and _concrete(kv_lengths)
            and (num_seqs is None or _concrete(num_seqs))):
        return  # under jit the layout is trusted
    n = s if num_seqs is None else int(num_seqs)
    starts = np.asarray(query_starts)[:n + 1]
    t = q.shape[0]
    if starts.min() < 0 or starts.max() > t or np.any(np.diff(starts) < 0):
        raise ValueError(f"query_starts[:num_seqs + 1] must be non-decreasing within [0, T] = "
                         f"[0, {t}]; got {starts.tolist()}")
    q_lens, kv = np.diff(starts), np.asarray(kv_lengths)[:n]
    capacity = page_table.shape[1] * k_pages.shape[1]
    bad = np.flatnonzero((kv < q_lens) | (kv > capacity))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"kv_lengths must lie in [q_len, pages_per_seq * page_size] (the cache "
                         f"holds each sequence's new tokens too; capacity {capacity}); got "
                         f"kv_lengths[{i}]={kv[i]} with q_len={q_lens[i]}")


def _check_integer(**arrays) -> None:
    for name, x in arrays.items():
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must have an integer dtype (int32); got {x.dtype}")


def _check_pages(q, k_pages, v_pages, k_scales, v_scales) -> None:
    """q [.., Hq, D] against the pages [num_pages, page_size, Hkv, D]: shapes, GQA, dtypes."""
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must have rank 4 [num_pages, page_size, Hkv, D]; "
                         f"got k_pages {shape_str(k_pages)}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must have the same shape; "
                         f"got k_pages {shape_str(k_pages)} and v_pages {shape_str(v_pages)}")
    if min(q.shape) < 1 or min(k_pages.shape) < 1:
        raise ValueError(f"q and k_pages must have no empty axis; "
                         f"got q {shape_str(q)} and k_pages {shape_str(k_pages)}")
    if q.shape[2] != k_pages.shape[3]:
        raise ValueError(f"q and k_pages must have the same head dim D; "
                         f"got q {shape_str(q)} and k_pages {shape_str(k_pages)}")
    hq, hkv = q.shape[1], k_pages.shape[2]
    if hq % hkv:
        raise ValueError(f"the number of query heads must be a multiple of the number of KV heads "
                         f"(Hq % Hkv == 0); got Hq={hq}, Hkv={hkv}")
    check_float_dtype("q", q)
    _check_page_dtypes(q, k_pages, v_pages, k_scales, v_scales)


def _check_table_values(page_table, num_pages: int) -> None:
    """Page ids in range, checked only when concrete (outside jit); under jit they are trusted."""
    if _concrete(page_table) and page_table.size:
        pt = np.asarray(page_table)
        if pt.min() < 0 or pt.max() >= num_pages:
            raise ValueError(f"page_table entries must lie in [0, num_pages) = [0, {num_pages}); "
                             f"got values in [{pt.min()}, {pt.max()}]")


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_page_dtypes(q, k_pages, v_pages, k_scales, v_scales) -> None:
    """Float pages share q's dtype; int8 pages come with float32 scales [num_pages, page_size,
    Hkv] for K and for V (and only int8 pages take scales)."""
    if jnp.dtype(k_pages.dtype) != jnp.dtype(v_pages.dtype):
        raise ValueError(f"k_pages and v_pages must share a dtype; got {k_pages.dtype} and "
                         f"{v_pages.dtype}")
    if jnp.dtype(k_pages.dtype) != jnp.dtype(jnp.int8):
        if k_scales is not None or v_scales is not None:
            raise ValueError(f"k_scales/v_scales go with int8 pages; got {k_pages.dtype} pages")
        if jnp.dtype(k_pages.dtype) != jnp.dtype(q.dtype):
            raise ValueError(f"q, k_pages and v_pages must share a dtype (or the pages be int8 "
                             f"with scales); got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
        return
    for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
        if scales is None:
            raise ValueError(f"int8 pages need {name}: float32 [num_pages, page_size, Hkv] = "
                             f"{list(k_pages.shape[:3])}")
        if scales.shape != k_pages.shape[:3] or jnp.dtype(scales.dtype) != jnp.float32:
            raise ValueError(f"{name} must be float32 [num_pages, page_size, Hkv] = "
                             f"{list(k_pages.shape[:3])}; got {scales.dtype} {shape_str(scales)}")
