"""Tile logic shared by the XLA and Pallas paths: block sizes, padding, in-tile masks, sparsity.

Positions. Key slot ``c`` sits at position ``c``; query row ``r`` sits at position ``r + S - T``
(the queries are the last T positions, so a causal mask aligns bottom-right). Key ``c`` is visible
to query ``r`` iff

    r < T and c < S                                   (padding is never visible)
    and (not causal or c <= pos)                       (pos = r + S - T)
    and (window is None or pos - left <= c <= pos + right)
    and (segments is None or q_ids[r] == kv_ids[c]).

Block sparsity. For a q block the visible keys of the causal/window band form one contiguous
interval (each row sees an interval whose ends grow with the row), so the KV blocks a q block must
visit are a contiguous range ``[lo, hi)``, and likewise the q blocks a KV block must visit. With
segment ids, a tile whose q-id range ``[min, max]`` and kv-id range do not intersect is dropped too;
the loops then run from the first to the last surviving tile. That is exact for packed sequences
given as one sorted [batch, S] array (the q ids are the kv ids at the query positions); otherwise
(unsorted ids, or a (q_ids, kv_ids) pair, even each sorted) it is conservative: it may keep a tile
without a visible pair (computed, all masked), and never skips a tile that holds one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

# A large finite negative for masked scores: exp(MASK - m) underflows to 0 without inf - inf NaNs.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and Triton launch settings of the three attention kernels.

    The Mosaic GPU forward ("pallas_mgpu") reads block_q, block_k, num_stages (its TMA pipeline
    depth: K/V tiles in flight) and num_consumers (compute warpgroups per program, each with its
    own block_q rows; 2 adds a third warpgroup that only issues the TMA copies, FlashAttention-3's
    warp specialization). Its backward is chosen by mgpu_backward: "triton" (the default until a
    GPU measures the other: pallas_gpu's kernels, reading the rest) or "mosaic" (the Mosaic GPU
    kernels of pallas_mgpu_bwd.py: the dk/dv kernel's tiles block_q_bwd x block_k_bwd, the dq
    kernel's ``dq``, each 64 or 128, num_stages_bwd TMA slots per pipeline and
    num_consumers_bwd compute warpgroups per program, as num_consumers does for the forward).
    Keep the Mosaic backward's tiles at 64 rows per warpgroup: a float32 [rows, cols] tile costs
    rows x cols / 128 registers per thread, and the dk/dv kernel holds dK, dV, S^T and dP^T (the
    dq kernel dQ, S and dP), so 128-row tiles at D = 128 need ~256-288 of the 232 registers a
    consumer gets and likely spill (counted, not yet seen in ptxas's report).

    Forward tiles are (block_q x block_k), the dk/dv kernel's (block_q_bwd x block_k_bwd) and the dq
    kernel's (block_q_dq x block_k_dq), which default to the dk/dv ones. The backward kernels like
    asymmetric tiles: dk/dv holds a KV tile and streams narrow q tiles, dq the reverse. num_warps
    None picks 4 for head dims up to 64 and 8 above. The xla and pallas_tpu backends read only
    block_q and block_k (their backward passes reuse the forward tiles) and ignore the rest."""

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    num_warps: int | None = None
    num_warps_bwd: int | None = None
    num_stages: int = 2
    num_stages_bwd: int = 2
    num_consumers: int = 1
    mgpu_backward: str = "triton"
    num_consumers_bwd: int = 1

    @property
    def dq(self) -> tuple[int, int]:
        """(block_q, block_k) of the dq kernel."""
        return (self.block_q_dq or self.block_q_bwd, self.block_k_dq or self.block_k_bwd)


# One table for every backend's default tiles. The Pallas GPU entries were chosen by
# experiments/tune_attention.py on an H200 (bfloat16, D = 128; see BENCHMARKS.md); wide heads halve
# the tiles so q, k, v and the accumulator fit in shared memory and registers.
DEFAULT_BLOCK_SIZES: dict[str, BlockSizes] = {
    "xla": BlockSizes(block_q=512, block_k=512, block_q_bwd=512, block_k_bwd=512),
    "pallas_gpu": BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64),
    "pallas_gpu_wide": BlockSizes(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32),
    # MXU-sized tiles; the Mosaic kernels use the forward tiles for the backward too.
    "pallas_tpu": BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128),
    # Mosaic GPU (Hopper) forward, FlashAttention-3's layout: two consumer warpgroups of 64 q rows
    # each and a TMA producer warpgroup, 128-wide K/V tiles double-buffered (160 KiB of shared
    # memory at D = 128: one program per SM). Untuned: jax's attention_mgpu defaults until a GPU
    # session measures ours. The backward runs the Triton kernels with pallas_gpu's *_bwd tiles
    # (mgpu_backward="triton") until a GPU session measures the Mosaic GPU one ("mosaic"): 64 x 64
    # tiles too, two consumer warpgroups (FlashAttention-3's backward layout), also untuned.
    "pallas_mgpu": BlockSizes(block_q=64, block_k=128, block_q_bwd=64, block_k_bwd=64,
                              num_stages=2, num_consumers=2, num_consumers_bwd=2),
}
PALLAS_WIDE_HEAD_DIM = 256  # padded head dims at or above this use "pallas_gpu_wide"
PALLAS_MIN_BLOCK = 16  # Triton's dot needs every operand dimension >= 16


def default_block_sizes(backend: str, head_dim: int) -> BlockSizes:
    """The table entry for ``backend`` ("xla", "pallas", "pallas_tpu" or "pallas_mgpu") at this
    head dim."""
    if backend in ("xla", "pallas_tpu", "pallas_mgpu"):
        return DEFAULT_BLOCK_SIZES[backend]
    if padded_head_dim(head_dim) >= PALLAS_WIDE_HEAD_DIM:
        return DEFAULT_BLOCK_SIZES["pallas_gpu_wide"]
    return DEFAULT_BLOCK_SIZES["pallas_gpu"]


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_head_dim(head_dim: int) -> int:
    """Triton tiles are powers of two, at least 16 wide."""
    return max(PALLAS_MIN_BLOCK, next_power_of_2(head_dim))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def span_pages(pages_per_seq: int, page_size: int, window: int | None, tokens: int = 1) -> int:
    """Pages of a page-table row that the keys of ``tokens`` consecutive queries can lie in: the
    whole row, or with a left window w the pages their w + tokens keys (from the first query's
    window start to the last query) can straddle, a partial page at each end:
    cdiv(w + tokens - 1, page_size) + 1, at most the row's width. What the paged kernels walk
    (and the GPU decode kernel splits) when a window is given."""
    if window is None:
        return pages_per_seq
    return min(pages_per_seq, cdiv(window + tokens - 1, page_size) + 1)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of the mask (see the module docstring for the rule)."""

    t: int
    s: int
    causal: bool
    window: tuple[int, int] | None
    segments: bool

    @property
    def offset(self) -> int:
        return self.s - self.t


def may_mask(spec: MaskSpec, t_pad: int, s_pad: int) -> bool:
    """Can any tile hold an invisible pair (causal, window, segments or padding)? If not, no
    kernel needs to build a mask."""
    return (spec.causal or spec.window is not None or spec.segments or t_pad != spec.t
            or s_pad != spec.s)


def tile_mask(spec: MaskSpec, rows, cols, q_seg=None, kv_seg=None, *, t_pad: int, s_pad: int):
    """Boolean visibility of a tile, or None when nothing in it can be masked.

    rows int32 [..., bq, 1] and cols int32 [..., 1, bk] are padded-array indices; q_seg [..., bq, 1]
    and kv_seg [..., 1, bk] the matching segment ids. Only jnp comparisons, so it runs inside a
    Pallas kernel as well as in plain XLA.
    """
    mask = None

    def conj(a, b):
        return b if a is None else a & b

    if t_pad != spec.t:
        mask = conj(mask, rows < spec.t)
    if s_pad != spec.s:
        mask = conj(mask, cols < spec.s)
    pos = rows + spec.offset
    if spec.causal:
        mask = conj(mask, cols <= pos)
    if spec.window is not None:
        left, right = spec.window
        mask = conj(mask, (cols >= pos - left) & (cols <= pos + right))
    if spec.segments:
        mask = conj(mask, q_seg == kv_seg)
    return mask


def online_softmax_step(acc: jax.Array, m: jax.Array, l: jax.Array, s: jax.Array,
                        mask: jax.Array | None, v: jax.Array, spec: str,
                        v_valid: jax.Array | None = None):
    """Fold one block of scores into the running softmax state (the FlashAttention recurrence).

    acc f32 [..., D] is the unnormalized output, m f32 [...] the running max, l f32 [...] the running
    sum; s f32 [..., k] are the block's scores (masked entries already MASK_VALUE); `spec` is the
    einsum of probabilities with v. Masked probabilities are zeroed, so a row that sees nothing
    keeps l == 0.

    v_valid (bool, broadcastable to v) marks the keys that hold real tokens; the other V rows are
    zeroed before P @ V. A zeroed probability does not hide them: 0 * NaN = NaN, and a paged cache
    holds whatever its slots last held (a reused page whose fp16 K/V overflowed, a never-written
    slot past a sequence's length), so without this one NaN or Inf there poisons every row."""
    m_new = jnp.maximum(m, s.max(-1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    if v_valid is not None:
        v = jnp.where(v_valid, v, jnp.zeros((), v.dtype))
    l = l * corr + p.sum(-1)
    acc = acc * corr[..., None] + jnp.einsum(spec, p.astype(v.dtype), v,
                                             preferred_element_type=jnp.float32)
    return acc, m_new, l


def finish_online_softmax(acc: jax.Array, m: jax.Array, l: jax.Array, *, log=jnp.log,
                          keepdims: bool = False):
    """The running state of ``online_softmax_step`` -> (out f32 [..., D] = acc / l, lse f32
    [...] = m + log l). Rows that saw no key (l == 0) get out 0 and lse -inf, not NaN.

    m, l are [...], or [..., 1] with ``keepdims`` (the Mosaic kernels keep their statistics as
    [rows, 1] VMEM tiles; lse then is [..., 1] too). ``log`` is that of the scores' base:
    jnp.log2 for base-2 scores (the Triton forward's exp2), which gives lse in base 2."""
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    out = acc / (safe_l if keepdims else safe_l[..., None])
    return out, jnp.where(seen, m + log(safe_l), -jnp.inf)


def pool_page_ids(page_table, pages: jax.Array) -> jax.Array:
    """page_table as int32 ids clamped into [0, num_pages) of ``pages`` [num_pages, ...]: the
    kernels gather pages without bounds checks, and under jit a table (or the count of its real
    rows) is traced, so a bad id could otherwise read outside the pool."""
    return jnp.clip(jnp.asarray(page_table, jnp.int32), 0, pages.shape[0] - 1)


def dequantize(values: jax.Array, scales: jax.Array | None, dtype) -> jax.Array:
    """int8 K/V values [..., D] times their float32 scales [...] (one per token and head), in
    `dtype`; float values (scales None) are only cast. The product is formed in float32."""
    if scales is None:
        return values.astype(dtype)
    return (values.astype(jnp.float32) * scales[..., None].astype(jnp.float32)).astype(dtype)


def gather_kv(k_pages, v_pages, k_scales, v_scales, ids: jax.Array, dtype,
              shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """K and V of the pages ``ids``, dequantized (int8 values times their scales; float pages are
    only cast) to ``dtype`` and reshaped to ``shape``, e.g. the pages' tokens as one axis.

    The pages [num_pages, page_size, ...] and scales may be arrays (the XLA paths) or Pallas refs
    (the kernels), which index alike."""
    return tuple(dequantize(pages[ids], None if scales is None else scales[ids], dtype)
                 .reshape(shape) for pages, scales in ((k_pages, k_scales), (v_pages, v_scales)))


def pad_to(x: jax.Array, axis: int, size: int, mode: str = "constant") -> jax.Array:
    """Pad ``axis`` of ``x`` at the end up to ``size`` (zeros, or edge values for segment ids)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode=mode)


def block_visibility(spec: MaskSpec, block_q: int, block_k: int, t_pad: int, s_pad: int,
                     q_seg=None, kv_seg=None) -> jax.Array:
    """Bool [batch or 1, t_pad // block_q, s_pad // block_k]: may the tile hold a visible pair?

    q_seg int32 [batch, t_pad], kv_seg int32 [batch, s_pad] are edge-padded segment ids (padding
    repeats the last id, so it never widens a block's id range).
    """
    nq, nk = t_pad // block_q, s_pad // block_k
    r0 = jnp.arange(nq, dtype=jnp.int32) * block_q
    r1 = jnp.minimum(r0 + block_q, spec.t) - 1
    c0 = jnp.arange(nk, dtype=jnp.int32) * block_k
    c1 = jnp.minimum(c0 + block_k, spec.s) - 1
    p0, p1 = r0 + spec.offset, r1 + spec.offset
    lower = jnp.zeros_like(p0)
    upper = jnp.full_like(p1, spec.s - 1)
    if spec.window is not None:
        left, right = spec.window
        lower = jnp.maximum(p0 - left, 0)
        upper = jnp.minimum(p1 + right, spec.s - 1)
    if spec.causal:
        upper = jnp.minimum(upper, p1)
    vis = ((c0[None, :] <= upper[:, None]) & (c1[None, :] >= lower[:, None])
           & (r0[:, None] < spec.t) & (c0[None, :] < spec.s))  # [nq, nk]
    vis = vis[None]
    if spec.segments:
        qb = q_seg.reshape(q_seg.shape[0], nq, block_q)
        kb = kv_seg.reshape(kv_seg.shape[0], nk, block_k)
        q_min, q_max = qb.min(-1), qb.max(-1)  # [batch, nq]
        k_min, k_max = kb.min(-1), kb.max(-1)  # [batch, nk]
        vis = (vis & (q_min[:, :, None] <= k_max[:, None, :])
               & (q_max[:, :, None] >= k_min[:, None, :]))
    return vis


def loop_bounds(vis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., n, m] bool -> int32 lo, hi [..., n]: first and one-past-last visible column.

    A row with no visible column gets lo = hi = 0 (an empty loop).
    """
    m = vis.shape[-1]
    any_ = vis.any(-1)
    lo = jnp.argmax(vis, axis=-1)
    hi = m - jnp.argmax(vis[..., ::-1], axis=-1)
    return (jnp.where(any_, lo, 0).astype(jnp.int32), jnp.where(any_, hi, 0).astype(jnp.int32))


def program_bounds(vis, full, consumers: int) -> tuple[jax.Array, jax.Array]:
    """Loop bounds for kernels whose programs run ``consumers`` rows of tiles (one per compute
    warpgroup) over one shared stream of the other axis' tiles (the Mosaic GPU backward).

    bool [n, m] visible / fully visible tiles per row of tiles -> (int32 [2, n]: per row its
    unmasked tiles [full_lo, full_hi); int32 [2, n // consumers]: per program the union [lo, hi)
    of its rows' visited tiles, which all its consumers walk).

    lo <= full_lo <= full_hi <= hi, so masked [lo, full_lo), unmasked [full_lo, full_hi) and
    masked [full_hi, hi) tile the union; a tile outside a row's own range is fully masked for it
    (correct, and the only waste when consumers' ranges differ). Empty rows do not widen the
    union; a program with none gets lo = hi = 0."""
    lo, hi = loop_bounds(vis)  # [n]
    nonempty = (hi > lo).reshape(-1, consumers)
    any_ = nonempty.any(-1)
    union_lo = jnp.where(nonempty, lo.reshape(-1, consumers), vis.shape[-1]).min(-1)
    union = jnp.stack([jnp.where(any_, union_lo, 0),
                       jnp.where(any_, hi.reshape(-1, consumers).max(-1), 0)])
    row_lo, row_hi = (jnp.repeat(u, consumers) for u in union)
    full_lo, full_hi = loop_bounds(full)
    has_full = full.any(-1)  # rows without full tiles run their whole range masked
    full_lo = jnp.clip(jnp.where(has_full, full_lo, row_hi), row_lo, row_hi)
    full_hi = jnp.clip(jnp.where(has_full, full_hi, row_hi), full_lo, row_hi)
    return jnp.stack([full_lo, full_hi]), union


def banded_loop(lo, full_lo, full_hi, hi, body, init, masked: bool):
    """fori_loops over tiles [lo, hi): masked edges, unmasked middle (one plain loop when
    nothing can be masked). ``body(i, carry, masked)``."""
    if not masked:
        return jax.lax.fori_loop(lo, hi, functools.partial(body, masked=False), init)
    carry = jax.lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), init)
    carry = jax.lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def full_visibility(spec: MaskSpec, block_q: int, block_k: int, t_pad: int,
                    s_pad: int) -> jax.Array:
    """Bool [1, t_pad // block_q, s_pad // block_k]: is every pair of the tile visible?

    Such tiles skip the in-tile mask. With segment ids no tile is known to be full (ids are data),
    so every tile is masked. Within a row of tiles the full ones are contiguous (the band's interior),
    which lets a kernel split its loop into masked edges and an unmasked middle."""
    nq, nk = t_pad // block_q, s_pad // block_k
    if spec.segments:
        return jnp.zeros((1, nq, nk), bool)
    r0 = jnp.arange(nq, dtype=jnp.int32) * block_q
    c0 = jnp.arange(nk, dtype=jnp.int32) * block_k
    r1, c1 = r0 + block_q - 1, c0 + block_k - 1
    p0, p1 = r0 + spec.offset, r1 + spec.offset  # positions of the tile's first and last row
    full = (r1[:, None] < spec.t) & (c1[None, :] < spec.s)
    if spec.causal:
        full &= c1[None, :] <= p0[:, None]
    if spec.window is not None:
        left, right = spec.window
        full &= (c0[None, :] >= p1[:, None] - left) & (c1[None, :] <= p0[:, None] + right)
    return full[None]
