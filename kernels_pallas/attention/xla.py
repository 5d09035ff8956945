"""Flash attention in plain jnp: online softmax over KV blocks, memory linear in sequence length.

Algorithm (FlashAttention-2 in XLA). Forward: ``lax.map`` over q blocks; for each, a ``fori_loop``
over the KV blocks in ``[lo, hi)`` (the tiles the causal/window/segment mask leaves non-empty, see
``tiling.py``) keeps a running max ``m``, sum ``l`` and float32 accumulator; out = acc / l and
lse = m + log l. Backward (``jax.custom_vjp``, residuals: q, k, v, out, lse): one ``lax.map`` over
q blocks accumulates dq over its KV blocks, another over KV blocks accumulates dk, dv over its q
blocks, recomputing probabilities from the saved lse. GQA: q is viewed as
[batch, T, Hkv, groups, D], so K/V are never repeated and dk/dv sum over each KV head's group.

Memory touched: inputs, outputs and per step one [batch, Hkv, groups, block_q, block_k] float32
score tile; nothing of size T x S. The loop bounds are shared by the batch (min/max over it): with
segment ids that differ across the batch every example visits the union of the examples' tiles,
which may be more than ``tile_fraction`` (the average of each example's own tiles, as the Pallas
kernels visit them) reports.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.attention import tiling
from kernels_pallas.attention.tiling import MASK_VALUE, MaskSpec


@dataclasses.dataclass(frozen=True)
class _Config:
    spec: MaskSpec
    scale: float
    softcap: float | None
    block_q: int
    block_k: int
    t_pad: int
    s_pad: int


def flash_attention(q, k, v, q_seg, kv_seg, *, spec: MaskSpec, scale: float,
                    softcap: float | None, block_q: int, block_k: int):
    """q [batch, T, Hq, D]; k, v [batch, S, Hkv, D]; q_seg int32 [batch, T], kv_seg int32
    [batch, S] or None -> (out [batch, T, Hq, D] in q.dtype, lse float32 [batch, T, Hq])."""
    block_q, block_k = min(block_q, spec.t), min(block_k, spec.s)
    t_pad = tiling.cdiv(spec.t, block_q) * block_q
    s_pad = tiling.cdiv(spec.s, block_k) * block_k
    cfg = _Config(spec, scale, softcap, block_q, block_k, t_pad, s_pad)
    qp, kp, vp = tiling.pad_to(q, 1, t_pad), tiling.pad_to(k, 1, s_pad), tiling.pad_to(v, 1, s_pad)
    if spec.segments:
        q_seg = tiling.pad_to(q_seg, 1, t_pad, mode="edge")
        kv_seg = tiling.pad_to(kv_seg, 1, s_pad, mode="edge")
    vis = tiling.block_visibility(spec, block_q, block_k, t_pad, s_pad, q_seg, kv_seg)
    kv_lo, kv_hi = tiling.loop_bounds(vis)  # [batch or 1, nq]
    q_lo, q_hi = tiling.loop_bounds(jnp.swapaxes(vis, 1, 2))  # [batch or 1, nk]
    # One loop serves the whole batch: visit the union of the rows' tiles.
    bounds = (kv_lo.min(0), kv_hi.max(0), q_lo.min(0), q_hi.max(0))
    out, lse = _attend(qp, kp, vp, q_seg, kv_seg, bounds, cfg)
    return out[:, :spec.t], lse[:, :spec.t]


def _scores(cfg, q, k):
    """q [batch, bq, Hkv, groups, D], k [batch, bk, Hkv, D] -> scores and tanh(raw / cap) (or
    None), both float32 [batch, Hkv, groups, bq, bk]."""
    raw = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * cfg.scale
    if cfg.softcap is None:
        return raw, None
    th = jnp.tanh(raw / cfg.softcap)
    return cfg.softcap * th, th


def _mask(cfg, i, j, q_seg, kv_seg):
    """Tile mask broadcastable to [batch, Hkv, groups, bq, bk], or None."""
    rows = (i * cfg.block_q + jnp.arange(cfg.block_q, dtype=jnp.int32))[:, None]
    cols = (j * cfg.block_k + jnp.arange(cfg.block_k, dtype=jnp.int32))[None, :]
    qs = ks = None
    if cfg.spec.segments:
        qs = _blocks(q_seg, i, cfg.block_q)[:, None, None, :, None]  # [batch, 1, 1, bq, 1]
        ks = _blocks(kv_seg, j, cfg.block_k)[:, None, None, None, :]  # [batch, 1, 1, 1, bk]
    return tiling.tile_mask(cfg.spec, rows, cols, qs, ks, t_pad=cfg.t_pad, s_pad=cfg.s_pad)


def _group(x, hkv):
    """[batch, n, Hq, ...] -> [batch, n, Hkv, groups, ...]."""
    return x.reshape(x.shape[0], x.shape[1], hkv, x.shape[2] // hkv, *x.shape[3:])


def _blocks(x, n, size):
    """Slice ``size`` rows at block ``n`` of axis 1."""
    return lax.dynamic_slice_in_dim(x, n * size, size, 1)


def _forward(q, k, v, q_seg, kv_seg, bounds, cfg):
    batch, _, hq, d = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    qg = _group(q, hkv)  # [batch, T_pad, Hkv, groups, D]
    kv_lo, kv_hi = bounds[0], bounds[1]
    stat_shape = (batch, hkv, groups, cfg.block_q)

    def q_block(i):
        qi = _blocks(qg, i, cfg.block_q)

        def body(j, carry):
            acc, m, l = carry
            kj, vj = _blocks(k, j, cfg.block_k), _blocks(v, j, cfg.block_k)
            s, _ = _scores(cfg, qi, kj)
            mask = _mask(cfg, i, j, q_seg, kv_seg)
            if mask is not None:
                s = jnp.where(mask, s, MASK_VALUE)
            return tiling.online_softmax_step(acc, m, l, s, mask, vj, "bhgqk,bkhd->bhgqd")

        init = (jnp.zeros((*stat_shape, d), jnp.float32), jnp.full(stat_shape, -jnp.inf),
                jnp.zeros(stat_shape, jnp.float32))
        out, lse = tiling.finish_online_softmax(*lax.fori_loop(kv_lo[i], kv_hi[i], body, init))
        # [batch, Hkv, groups, bq, D], [batch, Hkv, groups, bq]
        return out.astype(q.dtype), lse

    nq = cfg.t_pad // cfg.block_q
    out, lse = lax.map(q_block, jnp.arange(nq))  # [nq, batch, Hkv, groups, bq, (D)]
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(batch, cfg.t_pad, hq, d)
    lse = jnp.transpose(lse, (1, 0, 4, 2, 3)).reshape(batch, cfg.t_pad, hq)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(q, k, v, q_seg, kv_seg, bounds, cfg):
    return _forward(q, k, v, q_seg, kv_seg, bounds, cfg)


def _attend_fwd(q, k, v, q_seg, kv_seg, bounds, cfg):
    out, lse = _forward(q, k, v, q_seg, kv_seg, bounds, cfg)
    return (out, lse), (q, k, v, q_seg, kv_seg, bounds, out, lse)


def _attend_bwd(cfg, res, cts):
    q, k, v, q_seg, kv_seg, bounds, out, lse = res
    d_out, d_lse = cts
    hkv = k.shape[2]
    kv_lo, kv_hi, q_lo, q_hi = bounds
    # dS = P * (dP - delta); the lse cotangent adds P * d_lse, folded into delta.
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), -1) - d_lse
    # Empty rows have lse -inf; +inf makes their recomputed probabilities exactly 0.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    qg, dog = _group(q, hkv), _group(d_out, hkv)  # [batch, T_pad, Hkv, groups, D]
    lse_g = jnp.moveaxis(_group(lse, hkv), 1, -1)  # [batch, Hkv, groups, T_pad]
    delta_g = jnp.moveaxis(_group(delta, hkv), 1, -1)

    def tile_grads(i, j, qi, doi, kj, vj):
        """Recompute P for tile (i, j) and return (P, dS w.r.t. the scaled raw scores)."""
        s, th = _scores(cfg, qi, kj)
        lse_i = lax.dynamic_slice_in_dim(lse_g, i * cfg.block_q, cfg.block_q, 3)[..., None]
        delta_i = lax.dynamic_slice_in_dim(delta_g, i * cfg.block_q, cfg.block_q, 3)[..., None]
        p = jnp.exp(s - lse_i)
        mask = _mask(cfg, i, j, q_seg, kv_seg)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = jnp.einsum("bqhgd,bkhd->bhgqk", doi, vj, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_i)
        if th is not None:
            ds = ds * (1.0 - th * th)
        return p, ds

    def dq_block(i):
        qi, doi = _blocks(qg, i, cfg.block_q), _blocks(dog, i, cfg.block_q)

        def body(j, dq):
            kj, vj = _blocks(k, j, cfg.block_k), _blocks(v, j, cfg.block_k)
            _, ds = tile_grads(i, j, qi, doi, kj, vj)
            return dq + jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(k.dtype), kj,
                                   preferred_element_type=jnp.float32)

        dq = lax.fori_loop(kv_lo[i], kv_hi[i], body, jnp.zeros(qi.shape, jnp.float32))
        return (dq * cfg.scale).astype(q.dtype)

    def dkv_block(j):
        kj, vj = _blocks(k, j, cfg.block_k), _blocks(v, j, cfg.block_k)

        def body(i, carry):
            dk, dv = carry
            qi, doi = _blocks(qg, i, cfg.block_q), _blocks(dog, i, cfg.block_q)
            p, ds = tile_grads(i, j, qi, doi, kj, vj)
            dv = dv + jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(d_out.dtype), doi,
                                 preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(q.dtype), qi,
                                 preferred_element_type=jnp.float32)
            return dk, dv

        zeros = jnp.zeros(kj.shape, jnp.float32)
        dk, dv = lax.fori_loop(q_lo[j], q_hi[j], body, (zeros, zeros))
        return (dk * cfg.scale).astype(k.dtype), dv.astype(v.dtype)

    batch = q.shape[0]
    dq = lax.map(dq_block, jnp.arange(cfg.t_pad // cfg.block_q))  # [nq, batch, bq, Hkv, g, D]
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape)
    dk, dv = lax.map(dkv_block, jnp.arange(cfg.s_pad // cfg.block_k))  # [nk, batch, bk, Hkv, D]
    dk = jnp.moveaxis(dk, 0, 1).reshape(batch, cfg.s_pad, *k.shape[2:])
    dv = jnp.moveaxis(dv, 0, 1).reshape(batch, cfg.s_pad, *v.shape[2:])
    return dq, dk, dv, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)
