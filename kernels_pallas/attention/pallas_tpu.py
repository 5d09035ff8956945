"""FlashAttention-2 as Pallas kernels for TPUs (Mosaic lowering; ``interpret=True`` on CPU).

Algorithm. The TPU grid runs sequentially on a core, so the KV loop is the grid's innermost,
"arbitrary" dimension and the running softmax state lives in VMEM scratch across its steps (the
GPU kernels loop inside a program instead). Three ``pallas_call``s:

* forward, grid (batch, Hq, q blocks, KV blocks): step j folds KV tile j into the scratch
  (running max m, sum l, float32 accumulator [block_q, D]) and the last step writes the output tile
  and its float32 log-sum-exp.
* dq, grid (batch, Hq, q blocks, KV blocks): recomputes P = exp(S - lse) per tile and accumulates
  dQ = dS @ K in scratch, with dS = P * (dP - delta) and dP = dO @ V^T.
* dk/dv, grid (batch, Hkv, KV blocks, groups, q blocks): holds one K/V tile while the query heads
  of its group and their q tiles stream past, accumulating dV = P^T @ dO and dK = dS^T @ Q in
  scratch; GQA gradients are summed per KV head without atomics.

Block sparsity. Per-row tile ranges (``tiling.block_visibility``/``loop_bounds``) are prefetched
into SMEM as scalars. The index maps clamp a skipped step's block index to the visited range, so the
pipeline re-uses the tile already in VMEM instead of fetching a new one, and ``pl.when`` skips the
arithmetic. HBM traffic is O(visited tiles x tile size), as on the GPU.

Layout. Mosaic wants the last two dims of every block divisible by (8, 128) or whole, so the wrapper
works in [batch, heads, seq, D] (one transpose each way). Row statistics (lse, delta) are
[batch, heads, seq, 1] and segment ids [batch, T, 1] / [batch, KV blocks, 1, block_k] (each KV
block's ids a whole [1, block_k] slab, legal for block_k < 128 too), so their blocks satisfy the
same rule. T and S are padded to block multiples; padded keys are masked, padded query rows are
dropped. In-tile index vectors are 2-D iotas (Mosaic has no 1-D iota).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.attention import tiling
from kernels_pallas.attention.tiling import MASK_VALUE, MaskSpec

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
TPU_MIN_BLOCK = 8  # sublane tiling: block rows must be multiples of 8


@dataclasses.dataclass(frozen=True)
class _Config:
    spec: MaskSpec
    scale: float
    softcap: float | None
    block_q: int
    block_k: int
    t_pad: int
    s_pad: int
    groups: int
    interpret: bool


def flash_attention(q, k, v, q_seg, kv_seg, *, spec: MaskSpec, scale: float,
                    softcap: float | None, block_q: int, block_k: int, interpret: bool):
    """q [batch, T, Hq, D]; k, v [batch, S, Hkv, D]; q_seg int32 [batch, T], kv_seg int32
    [batch, S] or None -> (out [batch, T, Hq, D] in q.dtype, lse float32 [batch, T, Hq]).

    Tiles are (block_q x block_k) in the forward and both backward kernels, multiples of 8 (checked
    by the public function; 128 suits the MXU); they shrink to the padded lengths of short inputs.
    """
    bq = min(block_q, tiling.cdiv(spec.t, TPU_MIN_BLOCK) * TPU_MIN_BLOCK)
    bk = min(block_k, tiling.cdiv(spec.s, TPU_MIN_BLOCK) * TPU_MIN_BLOCK)
    t_pad, s_pad = tiling.cdiv(spec.t, bq) * bq, tiling.cdiv(spec.s, bk) * bk
    cfg = _Config(spec, scale, softcap, bq, bk, t_pad, s_pad, q.shape[2] // k.shape[2], interpret)
    qt = jnp.swapaxes(tiling.pad_to(q, 1, t_pad), 1, 2)  # [batch, Hq, T_pad, D]
    kt = jnp.swapaxes(tiling.pad_to(k, 1, s_pad), 1, 2)  # [batch, Hkv, S_pad, D]
    vt = jnp.swapaxes(tiling.pad_to(v, 1, s_pad), 1, 2)
    if spec.segments:
        q_seg = tiling.pad_to(q_seg, 1, t_pad, mode="edge")
        kv_seg = tiling.pad_to(kv_seg, 1, s_pad, mode="edge")
    out, lse = _attend(qt, kt, vt, q_seg, kv_seg, cfg)
    out = jnp.swapaxes(out, 1, 2)[:, :spec.t]
    return out, jnp.swapaxes(lse[..., 0], 1, 2)[:, :spec.t]


def _tables(cfg, q_seg, kv_seg, batch, *, transpose: bool):
    """int32 (lo, hi) [batch, n]: the visited tiles of each q block (of each KV block)."""
    vis = tiling.block_visibility(cfg.spec, cfg.block_q, cfg.block_k, cfg.t_pad, cfg.s_pad,
                                  q_seg, kv_seg)
    if transpose:
        vis = jnp.swapaxes(vis, 1, 2)
    return tiling.loop_bounds(jnp.broadcast_to(vis, (batch, *vis.shape[1:])))


# Index maps divide with lax.div: jnp's floor division lowers through sign(), which Mosaic can only
# lower when it knows the chip; indices here are never negative, so truncation is the same.
def _clamp(j, lo, hi):
    """A skipped step's block index: the nearest visited one (the pipeline then fetches nothing)."""
    return jnp.clip(j, lo, jnp.maximum(hi - 1, lo))


def _scores(cfg, q, k, row0, col0, q_seg, kv_seg):
    """[bq, D] x [bk, D] -> float32 scores [bq, bk] (scaled, capped, masked) and tanh (or None)."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
    th = None
    if cfg.softcap is not None:
        th = jnp.tanh(s / cfg.softcap)
        s = cfg.softcap * th
    shape = s.shape
    rows = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = col0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = tiling.tile_mask(cfg.spec, rows, cols, q_seg, kv_seg, t_pad=cfg.t_pad, s_pad=cfg.s_pad)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    return s, th, mask


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, *refs, cfg):
    if cfg.spec.segments:
        q_seg_ref, kv_seg_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
    else:
        o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)

    @pl.when((j >= lo_ref[b, i]) & (j < hi_ref[b, i]))
    def _step():
        q_seg = q_seg_ref[...] if cfg.spec.segments else None  # [bq, 1]
        kv_seg = kv_seg_ref[...] if cfg.spec.segments else None  # [1, bk]
        s, _, mask = _scores(cfg, q_ref[...], k_ref[...], i * cfg.block_q, j * cfg.block_k,
                             q_seg, kv_seg)  # [bq, bk]
        m = m_ref[...]  # [bq, 1]
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)  # a row that sees nothing keeps l == 0
        m_ref[...] = m_new
        l_ref[...] = l_ref[...] * corr + p.sum(axis=1, keepdims=True)
        v = v_ref[...]
        acc_ref[...] = acc_ref[...] * corr + jnp.dot(p.astype(v.dtype), v,
                                                     preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        out, lse = tiling.finish_online_softmax(acc_ref[...], m_ref[...], l_ref[...],
                                                keepdims=True)  # [bq, D], [bq, 1]
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _dq_kernel(lo_ref, hi_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs, cfg):
    if cfg.spec.segments:
        q_seg_ref, kv_seg_ref, dq_ref, acc_ref = refs
    else:
        dq_ref, acc_ref = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((j >= lo_ref[b, i]) & (j < hi_ref[b, i]))
    def _step():
        q_seg = q_seg_ref[...] if cfg.spec.segments else None
        kv_seg = kv_seg_ref[...] if cfg.spec.segments else None
        k, v = k_ref[...], v_ref[...]
        s, th, _ = _scores(cfg, q_ref[...], k, i * cfg.block_q, j * cfg.block_k, q_seg, kv_seg)
        p = jnp.exp(s - lse_ref[...])  # masked scores give exactly 0
        dp = lax.dot_general(do_ref[...], v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        if th is not None:
            ds = ds * (1.0 - th * th)
        acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs, cfg):
    if cfg.spec.segments:
        q_seg_ref, kv_seg_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
    else:
        dk_ref, dv_ref, dk_acc, dv_acc = refs
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    @pl.when((i >= lo_ref[b, j]) & (i < hi_ref[b, j]))
    def _step():
        q_seg = q_seg_ref[...] if cfg.spec.segments else None
        kv_seg = kv_seg_ref[...] if cfg.spec.segments else None
        q, do = q_ref[...], do_ref[...]  # [bq, D]
        s, th, _ = _scores(cfg, q, k_ref[...], i * cfg.block_q, j * cfg.block_k, q_seg, kv_seg)
        p = jnp.exp(s - lse_ref[...])  # [bq, bk]
        dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, _TN,
                                       preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        if th is not None:
            ds = ds * (1.0 - th * th)
        dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, _TN,
                                       preferred_element_type=jnp.float32)

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _call(kernel, cfg, *, grid, in_specs, out_specs, out_shape, scratch, semantics, name, args):
    from jax.experimental.pallas import tpu as pltpu  # TPU dialect; importable on any jaxlib

    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch)
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg), grid_spec=grid_spec, out_shape=out_shape,
        compiler_params=None if cfg.interpret else pltpu.CompilerParams(
            dimension_semantics=semantics),
        interpret=cfg.interpret, name=name)(*args)


def _seg_args(q_seg, kv_seg, cfg):
    """Segment ids shaped so their blocks obey Mosaic's rule: q ids [batch, T_pad, 1] (blocks
    (block_q, 1)) and kv ids [batch, KV blocks, 1, block_k], whose (1, block_k) blocks are the
    array's whole last two dims for any block_k (a (1, block_k) block of [batch, 1, S] needed
    block_k % 128 == 0)."""
    batch = kv_seg.shape[0]
    return [q_seg[:, :, None], kv_seg.reshape(batch, cfg.s_pad // cfg.block_k, 1, cfg.block_k)]


def _forward(q, k, v, q_seg, kv_seg, cfg):
    from jax.experimental.pallas import tpu as pltpu

    batch, hq, _, d = q.shape
    bq, bk, groups = cfg.block_q, cfg.block_k, cfg.groups
    nq, nk = cfg.t_pad // bq, cfg.s_pad // bk
    lo, hi = _tables(cfg, q_seg, kv_seg, batch, transpose=False)
    sq = pl.squeezed

    def kv_map(b, h, i, j, lo, hi):
        return b, lax.div(h, groups), _clamp(j, lo[b, i], hi[b, i]), 0

    in_specs = [pl.BlockSpec((sq, sq, bq, d), lambda b, h, i, j, lo, hi: (b, h, i, 0)),
                pl.BlockSpec((sq, sq, bk, d), kv_map), pl.BlockSpec((sq, sq, bk, d), kv_map)]
    args = [lo, hi, q, k, v]
    if cfg.spec.segments:
        in_specs += [pl.BlockSpec((sq, bq, 1), lambda b, h, i, j, lo, hi: (b, i, 0)),
                     pl.BlockSpec((sq, sq, 1, bk), lambda b, h, i, j, lo, hi: (
                         b, _clamp(j, lo[b, i], hi[b, i]), 0, 0))]
        args += _seg_args(q_seg, kv_seg, cfg)
    row = lambda b, h, i, j, lo, hi: (b, h, i, 0)  # noqa: E731
    return _call(
        _fwd_kernel, cfg, grid=(batch, hq, nq, nk), in_specs=in_specs,
        out_specs=[pl.BlockSpec((sq, sq, bq, d), row), pl.BlockSpec((sq, sq, bq, 1), row)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, hq, cfg.t_pad, 1), jnp.float32)],
        scratch=[pltpu.VMEM((bq, d), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                 pltpu.VMEM((bq, 1), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"),
        name="flash_attention_fwd_tpu", args=args)  # out [batch, Hq, T_pad, D], lse [..., 1]


def _backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, cfg):
    from jax.experimental.pallas import tpu as pltpu

    batch, hq, _, d = q.shape
    hkv, groups = k.shape[1], cfg.groups
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = cfg.t_pad // bq, cfg.s_pad // bk
    # dS = P * (dP - delta); the lse cotangent adds P * d_lse, folded into delta.
    delta = (jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), -1, keepdims=True)
             - d_lse)  # [batch, Hq, T_pad, 1]
    # Empty rows have lse -inf; +inf makes their recomputed probabilities exactly 0.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    sq = pl.squeezed
    seg_args = _seg_args(q_seg, kv_seg, cfg) if cfg.spec.segments else []

    lo, hi = _tables(cfg, q_seg, kv_seg, batch, transpose=False)
    row = lambda b, h, i, j, lo, hi: (b, h, i, 0)  # noqa: E731

    def kv_map(b, h, i, j, lo, hi):
        return b, lax.div(h, groups), _clamp(j, lo[b, i], hi[b, i]), 0

    dq_specs = [pl.BlockSpec((sq, sq, bq, d), row), pl.BlockSpec((sq, sq, bq, d), row),
                pl.BlockSpec((sq, sq, bq, 1), row), pl.BlockSpec((sq, sq, bq, 1), row),
                pl.BlockSpec((sq, sq, bk, d), kv_map), pl.BlockSpec((sq, sq, bk, d), kv_map)]
    if cfg.spec.segments:
        dq_specs += [pl.BlockSpec((sq, bq, 1), lambda b, h, i, j, lo, hi: (b, i, 0)),
                     pl.BlockSpec((sq, sq, 1, bk), lambda b, h, i, j, lo, hi: (
                         b, _clamp(j, lo[b, i], hi[b, i]), 0, 0))]
    dq = _call(
        _dq_kernel, cfg, grid=(batch, hq, nq, nk), in_specs=dq_specs,
        out_specs=pl.BlockSpec((sq, sq, bq, d), row),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch=[pltpu.VMEM((bq, d), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"), name="flash_attention_dq_tpu",
        args=[lo, hi, q, d_out, lse, delta, k, v, *seg_args])

    lo, hi = _tables(cfg, q_seg, kv_seg, batch, transpose=True)

    def q_map(b, h, j, g, i, lo, hi):
        return b, h * groups + g, _clamp(i, lo[b, j], hi[b, j]), 0

    kv_block = lambda b, h, j, g, i, lo, hi: (b, h, j, 0)  # noqa: E731
    dkv_specs = [pl.BlockSpec((sq, sq, bq, d), q_map), pl.BlockSpec((sq, sq, bq, d), q_map),
                 pl.BlockSpec((sq, sq, bq, 1), q_map), pl.BlockSpec((sq, sq, bq, 1), q_map),
                 pl.BlockSpec((sq, sq, bk, d), kv_block), pl.BlockSpec((sq, sq, bk, d), kv_block)]
    if cfg.spec.segments:
        dkv_specs += [pl.BlockSpec((sq, bq, 1), lambda b, h, j, g, i, lo, hi: (
                          b, _clamp(i, lo[b, j], hi[b, j]), 0)),
                      pl.BlockSpec((sq, sq, 1, bk), lambda b, h, j, g, i, lo, hi: (b, j, 0, 0))]
    dk, dv = _call(
        _dkv_kernel, cfg, grid=(batch, hkv, nk, groups, nq), in_specs=dkv_specs,
        out_specs=[pl.BlockSpec((sq, sq, bk, d), kv_block), pl.BlockSpec((sq, sq, bk, d), kv_block)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        name="flash_attention_dkv_tpu", args=[lo, hi, q, d_out, lse, delta, k, v, *seg_args])
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, q_seg, kv_seg, cfg):
    return _forward(q, k, v, q_seg, kv_seg, cfg)


def _attend_fwd(q, k, v, q_seg, kv_seg, cfg):
    out, lse = _forward(q, k, v, q_seg, kv_seg, cfg)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _attend_bwd(cfg, res, cts):
    q, k, v, q_seg, kv_seg, out, lse = res
    d_out, d_lse = cts  # [batch, Hq, T_pad, D], [batch, Hq, T_pad, 1]
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, cfg)
    return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)
