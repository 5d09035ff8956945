"""FlashAttention-2 as Pallas kernels for NVIDIA GPUs (Triton lowering; ``interpret=True`` on CPU).

Algorithm. Three ``pallas_call``s, FlashAttention-2 style:

* forward, grid (q blocks, batch, Hq): a program holds one [block_q, D] query tile in registers
  and loops over the KV blocks ``[kv_lo, kv_hi)`` that its mask leaves non-empty (causal, window and
  segment sparsity, ``tiling.py``); per KV block it computes scores (scaled, soft-capped, masked in
  the tile), updates the running max/sum in float32 and accumulates P @ V in float32. It writes the
  output tile and the float32 log-sum-exp of its rows.
* dq, grid (q blocks, batch, Hq): recomputes P = exp(S - lse) over the same KV range and
  accumulates dQ = dS @ K with dS = P * (dP - delta), dP = dO @ V^T.
* dk/dv, grid (KV blocks, batch, Hkv): holds one K and V tile and loops over the ``groups`` query
  heads that share this KV head and their q blocks ``[q_lo, q_hi)``, accumulating
  dV = P^T @ dO and dK = dS^T @ Q; GQA gradients are thus summed per KV head without atomics.

The backward saves only O and the LSE (plus inputs); delta = rowsum(O * dO) - d_lse is one fused
XLA reduction outside the kernels (the lse cotangent enters there, so gradients through a returned
lse are exact). Empty rows (nothing visible) give O = 0 and lse = -inf.

Memory touched per program: forward and dq read their q tile once and stream K/V tiles of the
visited range; dk/dv reads its K/V tile once and streams the group's q/dO tiles and lse/delta
rows. HBM traffic is O(visited tiles x tile size); nothing of size T x S exists.

Shapes. Triton needs power-of-two tiles of at least 16: the wrapper pads T and S to block
multiples (padded rows and keys are masked in the tile) and D to a power of two (zero columns do
not change scores, and the padded output columns are sliced off). Block sizes are arguments; the
defaults are in ``tiling.DEFAULT_BLOCK_SIZES``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.attention import tiling
from kernels_pallas.attention.tiling import MASK_VALUE, MaskSpec
from kernels_pallas.backend import triton_compiler_params

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


LOG2E = math.log2(math.e)  # scores are kept in base 2: exp(x) = exp2(x * log2(e))


@dataclasses.dataclass(frozen=True)
class _Config:
    spec: MaskSpec
    scale: float
    softcap: float | None
    blocks: tiling.BlockSizes  # shrunk to the padded lengths
    t_pad: int
    s_pad: int
    groups: int
    interpret: bool

    @property
    def masked(self) -> bool:
        return tiling.may_mask(self.spec, self.t_pad, self.s_pad)


def flash_attention(q, k, v, q_seg, kv_seg, *, spec: MaskSpec, scale: float,
                    softcap: float | None, blocks: tiling.BlockSizes, interpret: bool):
    """q [batch, T, Hq, D]; k, v [batch, S, Hkv, D]; q_seg int32 [batch, T], kv_seg int32
    [batch, S] or None -> (out [batch, T, Hq, D] in q.dtype, lse float32 [batch, T, Hq]).

    ``blocks`` must hold powers of two >= 16 (checked by the public function); they shrink to the
    padded sequence length for short inputs.
    """
    d = q.shape[-1]
    t_cap = tiling.next_power_of_2(max(spec.t, tiling.PALLAS_MIN_BLOCK))
    s_cap = tiling.next_power_of_2(max(spec.s, tiling.PALLAS_MIN_BLOCK))
    bq_dq, bk_dq = blocks.dq
    blocks = dataclasses.replace(
        blocks, block_q=min(blocks.block_q, t_cap), block_k=min(blocks.block_k, s_cap),
        block_q_bwd=min(blocks.block_q_bwd, t_cap), block_k_bwd=min(blocks.block_k_bwd, s_cap),
        block_q_dq=min(bq_dq, t_cap), block_k_dq=min(bk_dq, s_cap))
    # Powers of two: the largest block is a multiple of the others, so one padding serves all.
    q_multiple = max(blocks.block_q, blocks.block_q_bwd, blocks.block_q_dq)
    k_multiple = max(blocks.block_k, blocks.block_k_bwd, blocks.block_k_dq)
    t_pad = tiling.cdiv(spec.t, q_multiple) * q_multiple
    s_pad = tiling.cdiv(spec.s, k_multiple) * k_multiple
    cfg = _Config(spec, scale, softcap, blocks, t_pad, s_pad, q.shape[2] // k.shape[2], interpret)
    d_pad = tiling.padded_head_dim(d)
    qp = tiling.pad_to(tiling.pad_to(q, 1, t_pad), 3, d_pad)
    kp = tiling.pad_to(tiling.pad_to(k, 1, s_pad), 3, d_pad)
    vp = tiling.pad_to(tiling.pad_to(v, 1, s_pad), 3, d_pad)
    if spec.segments:
        q_seg = tiling.pad_to(q_seg, 1, t_pad, mode="edge")
        kv_seg = tiling.pad_to(kv_seg, 1, s_pad, mode="edge")
    out, lse = _attend(qp, kp, vp, q_seg, kv_seg, cfg)
    return out[:, :spec.t, :, :d], lse[:, :spec.t]


def _bounds(cfg, block_q, block_k, q_seg, kv_seg, batch, *, transpose: bool):
    """Loop bounds of one kernel's tiles: int32 [batch, n_pow2] tables (lo, full_lo, full_hi, hi).

    Per q block (per KV block with ``transpose``) the visited tiles are [lo, hi); of these,
    [full_lo, full_hi) are fully visible and skip the in-tile mask. Rows without full tiles get
    full_lo = full_hi = hi, so the whole range runs masked."""
    vis = tiling.block_visibility(cfg.spec, block_q, block_k, cfg.t_pad, cfg.s_pad, q_seg, kv_seg)
    full = tiling.full_visibility(cfg.spec, block_q, block_k, cfg.t_pad, cfg.s_pad)
    if transpose:
        vis, full = jnp.swapaxes(vis, 1, 2), jnp.swapaxes(full, 1, 2)
    vis = jnp.broadcast_to(vis, (batch, *vis.shape[1:]))
    full = jnp.broadcast_to(full, vis.shape)
    lo, hi = tiling.loop_bounds(vis)
    full_lo, full_hi = tiling.loop_bounds(full)
    has_full = full.any(-1)
    full_lo, full_hi = jnp.where(has_full, full_lo, hi), jnp.where(has_full, full_hi, hi)
    n = tiling.next_power_of_2(vis.shape[1])
    # Triton loads power-of-two blocks: pad the per-block table (padding is never read).
    return [tiling.pad_to(b, 1, n) for b in (lo, full_lo, full_hi, hi)]


def _compiler_params(cfg, d_pad, *, backward: bool):
    b = cfg.blocks
    warps = b.num_warps_bwd if backward else b.num_warps
    # Default warps: 4 up to D = 64, 8 above, as the [block_q, D] tiles and float32 accumulator
    # grow with D (ragged_pallas_gpu.py, whose query block is as tall, follows the same rule).
    return triton_compiler_params(warps or (4 if d_pad <= 64 else 8),
                                         b.num_stages_bwd if backward else b.num_stages,
                                         cfg.interpret)


def _banded_loop(bounds_refs, index, body, init, masked: bool):
    """``tiling.banded_loop`` over the tiles of row ``index``, its bounds read from the
    (lo, full_lo, full_hi, hi) tables."""
    return tiling.banded_loop(*(ref[index] for ref in bounds_refs), body, init, masked)


def _scores(cfg, q, k):
    """[bq, D] x [bk, D] -> float32 scores in base 2 (scaled, soft-capped, times log2(e)) [bq, bk]
    and tanh(raw / cap) (or None)."""
    raw = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
    if cfg.softcap is None:
        return raw * (cfg.scale * LOG2E), None
    th = jnp.tanh(raw * (cfg.scale / cfg.softcap))
    return th * (cfg.softcap * LOG2E), th


def _masked_scores(cfg, q, k, row0, col0, q_seg, kv_seg, masked: bool):
    """_scores with invisible pairs set to MASK_VALUE (only in tiles that may hold any)."""
    s, th = _scores(cfg, q, k)
    mask = None
    if masked:
        rows = row0 + jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]
        cols = col0 + jnp.arange(k.shape[0], dtype=jnp.int32)[None, :]
        mask = tiling.tile_mask(cfg.spec, rows, cols, q_seg, kv_seg, t_pad=cfg.t_pad,
                                s_pad=cfg.s_pad)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
    return s, th, mask


def _fwd_kernel(*refs, cfg):
    bounds, (q_ref, k_ref, v_ref), refs = refs[:4], refs[4:7], refs[7:]
    if cfg.spec.segments:
        q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    i = pl.program_id(0)
    q = q_ref[...]  # [bq, D]
    q_seg = q_seg_ref[...][:, None] if cfg.spec.segments else None

    def body(j, carry, masked):
        acc, m, l = carry
        col0 = j * bk
        k = k_ref[pl.ds(col0, bk), :]  # [bk, D]
        v = v_ref[pl.ds(col0, bk), :]
        kv_seg = kv_seg_ref[pl.ds(col0, bk)][None, :] if cfg.spec.segments else None
        s, _, mask = _masked_scores(cfg, q, k, i * bq, col0, q_seg, kv_seg, masked)  # [bq, bk]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if mask is not None and cfg.spec.segments:
            p = jnp.where(mask, p, 0.0)  # only segment ids can leave a real row empty: keep l == 0
        l = l * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + jnp.dot(p.astype(v.dtype), v,
                                            preferred_element_type=jnp.float32)
        return acc, m_new, l

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    out, lse = tiling.finish_online_softmax(*_banded_loop(bounds, i, body, init, cfg.masked),
                                            log=jnp.log2)  # lse in base 2
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse / LOG2E


def _dq_kernel(*refs, cfg):
    bounds, (q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref), refs = refs[:4], refs[4:10], refs[10:]
    if cfg.spec.segments:
        q_seg_ref, kv_seg_ref, dq_ref = refs
    else:
        (dq_ref,) = refs
    bq, bk = cfg.blocks.dq
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]  # [bq, D]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # [bq, 1], lse in base 2
    q_seg = q_seg_ref[...][:, None] if cfg.spec.segments else None

    def body(j, dq, masked):
        col0 = j * bk
        k = k_ref[pl.ds(col0, bk), :]
        v = v_ref[pl.ds(col0, bk), :]
        kv_seg = kv_seg_ref[pl.ds(col0, bk)][None, :] if cfg.spec.segments else None
        s, th, _ = _masked_scores(cfg, q, k, i * bq, col0, q_seg, kv_seg, masked)
        p = jnp.exp2(s - lse)  # masked scores give exactly 0
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        if th is not None:
            ds = ds * (1.0 - th * th)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = _banded_loop(bounds, i, body, jnp.zeros(q.shape, jnp.float32), cfg.masked)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg):
    bounds, (q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref), refs = refs[:4], refs[4:10], refs[10:]
    if cfg.spec.segments:
        q_seg_ref, kv_seg_ref, dk_ref, dv_ref = refs
    else:
        dk_ref, dv_ref = refs
    bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]  # [bk, D]
    kv_seg = kv_seg_ref[...][None, :] if cfg.spec.segments else None

    def head(g, carry):
        def body(i, carry, masked):
            dk, dv = carry
            row0 = i * bq
            q = q_ref[pl.ds(row0, bq), g, :]  # [bq, D]
            do = do_ref[pl.ds(row0, bq), g, :]
            lse = lse_ref[g, pl.ds(row0, bq)][:, None]  # base 2
            delta = delta_ref[g, pl.ds(row0, bq)][:, None]
            q_seg = q_seg_ref[pl.ds(row0, bq)][:, None] if cfg.spec.segments else None
            s, th, _ = _masked_scores(cfg, q, k, row0, j * bk, q_seg, kv_seg, masked)
            p = jnp.exp2(s - lse)
            dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN,
                                      preferred_element_type=jnp.float32)
            dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - delta)
            if th is not None:
                ds = ds * (1.0 - th * th)
            dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN,
                                      preferred_element_type=jnp.float32)
            return dk, dv

        return _banded_loop(bounds, j, body, carry, cfg.masked)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.groups, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _forward(q, k, v, q_seg, kv_seg, cfg):
    batch, _, hq, d_pad = q.shape
    bq, bk, groups = cfg.blocks.block_q, cfg.blocks.block_k, cfg.groups
    bounds = _bounds(cfg, bq, bk, q_seg, kv_seg, batch, transpose=False)
    sq = pl.squeezed
    table = pl.BlockSpec((sq, bounds[0].shape[1]), lambda i, b, h: (b, 0))
    in_specs = [table] * 4 + [
        pl.BlockSpec((sq, bq, sq, d_pad), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((sq, cfg.s_pad, sq, d_pad), lambda i, b, h: (b, 0, h // groups, 0)),
        pl.BlockSpec((sq, cfg.s_pad, sq, d_pad), lambda i, b, h: (b, 0, h // groups, 0)),
    ]
    args = [*bounds, q, k, v]
    if cfg.spec.segments:
        in_specs += [pl.BlockSpec((sq, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((sq, cfg.s_pad), lambda i, b, h: (b, 0))]
        args += [q_seg, kv_seg]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(cfg.t_pad // bq, batch, hq),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((sq, bq, sq, d_pad), lambda i, b, h: (b, i, h, 0)),
                   pl.BlockSpec((sq, sq, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, hq, cfg.t_pad), jnp.float32)],
        compiler_params=_compiler_params(cfg, d_pad, backward=False),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*args)
    return out, lse  # [batch, T_pad, Hq, D_pad], [batch, Hq, T_pad]


def _backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, cfg):
    batch, _, hq, d_pad = q.shape
    hkv, groups = k.shape[2], cfg.groups
    # dS = P * (dP - delta); the lse cotangent adds P * d_lse, folded into delta.
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), -1)  # [batch, T_pad, Hq]
    delta = jnp.swapaxes(delta, 1, 2) - d_lse  # [batch, Hq, T_pad]
    # The kernels work in base 2. Empty rows have lse -inf; +inf makes their recomputed
    # probabilities exactly 0.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
    sq = pl.squeezed
    seg_args = [q_seg, kv_seg] if cfg.spec.segments else []
    params = _compiler_params(cfg, d_pad, backward=True)

    bq, bk = cfg.blocks.dq
    dq_bounds = _bounds(cfg, bq, bk, q_seg, kv_seg, batch, transpose=False)
    dq_specs = [pl.BlockSpec((sq, dq_bounds[0].shape[1]), lambda i, b, h: (b, 0))] * 4 + [
        pl.BlockSpec((sq, bq, sq, d_pad), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((sq, bq, sq, d_pad), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((sq, sq, bq), lambda i, b, h: (b, h, i)),
        pl.BlockSpec((sq, sq, bq), lambda i, b, h: (b, h, i)),
        pl.BlockSpec((sq, cfg.s_pad, sq, d_pad), lambda i, b, h: (b, 0, h // groups, 0)),
        pl.BlockSpec((sq, cfg.s_pad, sq, d_pad), lambda i, b, h: (b, 0, h // groups, 0)),
    ]
    if cfg.spec.segments:
        dq_specs += [pl.BlockSpec((sq, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((sq, cfg.s_pad), lambda i, b, h: (b, 0))]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(cfg.t_pad // bq, batch, hq),
        in_specs=dq_specs,
        out_specs=pl.BlockSpec((sq, bq, sq, d_pad), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(*dq_bounds, q, d_out, lse, delta, k, v, *seg_args)

    bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd
    dkv_bounds = _bounds(cfg, bq, bk, q_seg, kv_seg, batch, transpose=True)
    dkv_specs = [pl.BlockSpec((sq, dkv_bounds[0].shape[1]), lambda j, b, h: (b, 0))] * 4 + [
        pl.BlockSpec((sq, cfg.t_pad, groups, d_pad), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((sq, cfg.t_pad, groups, d_pad), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((sq, groups, cfg.t_pad), lambda j, b, h: (b, h, 0)),
        pl.BlockSpec((sq, groups, cfg.t_pad), lambda j, b, h: (b, h, 0)),
        pl.BlockSpec((sq, bk, sq, d_pad), lambda j, b, h: (b, j, h, 0)),
        pl.BlockSpec((sq, bk, sq, d_pad), lambda j, b, h: (b, j, h, 0)),
    ]
    if cfg.spec.segments:
        dkv_specs += [pl.BlockSpec((sq, cfg.t_pad), lambda j, b, h: (b, 0)),
                      pl.BlockSpec((sq, bk), lambda j, b, h: (b, j))]
    kv_block = pl.BlockSpec((sq, bk, sq, d_pad), lambda j, b, h: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(cfg.s_pad // bk, batch, hkv),
        in_specs=dkv_specs,
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(*dkv_bounds, q, d_out, lse, delta, k, v, *seg_args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, q_seg, kv_seg, cfg):
    out, lse = _forward(q, k, v, q_seg, kv_seg, cfg)
    return out, jnp.swapaxes(lse, 1, 2)


def _attend_fwd(q, k, v, q_seg, kv_seg, cfg):
    out, lse = _forward(q, k, v, q_seg, kv_seg, cfg)
    return (out, jnp.swapaxes(lse, 1, 2)), (q, k, v, q_seg, kv_seg, out, lse)


def _attend_bwd(cfg, res, cts):
    q, k, v, q_seg, kv_seg, out, lse = res
    d_out, d_lse = cts  # [batch, T_pad, Hq, D_pad], [batch, T_pad, Hq]
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, out, lse, d_out, jnp.swapaxes(d_lse, 1, 2), cfg)
    return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)
