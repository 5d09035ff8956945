"""Ring attention: exact attention over a sequence sharded along one mesh axis.

Each of the P devices on `axis` holds a [batch, N/P, heads, head_dim] shard of q, k and v. K/V
shards travel around the ring (`lax.ppermute`, device i -> i+1) P-1 times; at every step each
device runs `kernels_pallas.flash_attention(..., return_lse=True)` of its own queries against the
visiting K/V block and folds the partial result into a running (out, lse) with
`merge_attention`. The next block's send has no data dependency on the current block's compute,
so XLA can overlap the two. GQA needs nothing special: flash_attention takes fewer KV heads, and
K/V are never repeated.

Causal masks need global positions, fixed by the layout of the sequence over the devices:

* "zigzag" (opt-in, see `sharding.zigzag`): device i holds chunks i and 2P-1-i of 2P. At step 0
  a device attends its own block causally. At step s >= 1 it holds the block of device
  j = i - s (mod P): if j < i, both local query chunks see all of K/V chunk j and none of chunk
  2P-1-j (one [2c x c] block); if j > i, only the late query chunk sees anything, all of both K/V
  chunks (one [c x 2c] block). Every device does the same work at every step, and blocks wholly
  in the future are never computed (a `lax.cond` on the device index picks the block).
* "contiguous" (default: the natural order, so an unpermuted input is never mis-masked): device
  i holds tokens [i N/P, (i+1) N/P). Step 0 is causal, a block from an earlier device is dense, a
  block from a later one is skipped by the `lax.cond`. Correct, but device P-1 does P times the
  work of device 0.

Without a causal mask the layout does not matter: every step is one dense block.

Backward: a `jax.custom_vjp` that replays the ring. The forward saves only the local q, k, v, out
and lse. The backward rotates K/V again; at each step it recomputes the block's partial
(o_j, lse_j) and pulls flash_attention's own VJP with the cotangents the LSE merge gives the
block (dO_j = w dO, dlse_j = w (rowsum(dO (o_j - O)) + dL), w = exp(lse_j - L)). dq accumulates
locally; dk/dv accumulators (float32) travel with their K/V block and one last hop brings them
home. Memory stays one K/V block per device, unlike autodiff through the loop, which would store
every visiting block. The recompute costs one extra block forward per step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from kernels_pallas import flash_attention, merge_attention
from sharding import sp_common


@dataclasses.dataclass(frozen=True)
class RingConfig:
    axis_name: str
    axis_size: int
    causal: bool
    layout: str
    scale: float | None
    backend: str


class _Part(NamedTuple):
    """Which rows of the local queries meet which rows of the visiting K/V, and how."""
    q_rows: slice
    kv_rows: slice
    causal: bool


_ALL = slice(None)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh,
                   axis: str = "sequence", causal: bool = False, layout: str = "contiguous",
                   segment_ids: jax.Array | None = None, softmax_scale: float | None = None,
                   backend: str = "auto", batch_axes: str | Sequence[str] | None = None
                   ) -> jax.Array:
    """Ring attention of q against k, v whose sequence dimension is sharded over mesh axis `axis`.

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim], heads % kv_heads
        == 0. The sequence is in `layout` order: for "zigzag", permute it with
        `sharding.zigzag_permute(x, mesh.shape[axis])` first (and back with `zigzag_unpermute`).
      mesh, axis: the mesh and the name of the axis the sequence is split over (P devices).
      causal: causal mask on the global positions the layout implies.
      layout: "contiguous" (natural order; seq % P == 0) or "zigzag" (balanced causal work;
        seq % 2P == 0 when causal).
      segment_ids: optional int [batch, seq] in the same layout; a query sees only keys with its id.
      softmax_scale, backend: passed to `kernels_pallas.flash_attention` per block.
      batch_axes: mesh axes the batch is split over (default: replicated).

    Returns:
      out [batch, seq, heads, head_dim] in q's dtype, in the same layout and sharding as q.
    """
    size = sp_common.axis_size(mesh, axis)
    sp_common.check_qkv(q, k, v, segment_ids, num_shards=size, layout=layout, causal=causal)
    sp_common.check_batch_axes(mesh, axis, batch_axes, q.shape[0])
    cfg = RingConfig(axis, size, bool(causal), layout,
                     None if softmax_scale is None else float(softmax_scale), backend)
    return sp_common.shard_over_sequence(functools.partial(ring_attention_shard, cfg=cfg),
                                         q, k, v, segment_ids, mesh=mesh, axis=axis,
                                         batch_axes=batch_axes)


def ring_attention_shard(q: jax.Array, k: jax.Array, v: jax.Array,
                         segment_ids: jax.Array | None = None, *, cfg: RingConfig) -> jax.Array:
    """The per-device body, for callers already inside a `shard_map` over `cfg.axis_name`.

    q [batch, n, heads, head_dim], k, v [batch, n, kv_heads, head_dim], segment_ids int
    [batch, n] or None: this device's shard (n = seq / P) -> out [batch, n, heads, head_dim]."""
    out, _ = _ring(q, k, v, segment_ids, cfg)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, segment_ids, cfg):
    return _ring_forward(q, k, v, segment_ids, cfg)


def _rotate(cfg: RingConfig, tree):
    """Send every array of `tree` one device along the ring (i -> i+1)."""
    perm = [(i, (i + 1) % cfg.axis_size) for i in range(cfg.axis_size)]
    return jax.tree.map(lambda x: lax.ppermute(x, cfg.axis_name, perm), tree)


def _parts(cfg: RingConfig, step, local_len: int) -> tuple[_Part | None, ...]:
    """The block computed at ring step `step`: one part, or two where the device's position in
    the ring decides (`lax.cond` on axis_index >= step, i.e. the K/V come from an earlier device);
    None is a block wholly in the future (skipped)."""
    if not cfg.causal:
        return (_Part(_ALL, _ALL, False),)
    if isinstance(step, int) and step == 0:
        return (_Part(_ALL, _ALL, True),)
    if cfg.layout == "zigzag":
        c = local_len // 2
        return (_Part(_ALL, slice(0, c), False),   # earlier device: its early chunk, all queries
                _Part(slice(c, None), _ALL, False))  # later device: late queries, both chunks
    return (_Part(_ALL, _ALL, False), None)


def _branch(cfg: RingConfig, step, fns, *operands):
    if len(fns) == 1:
        return fns[0](*operands)
    return lax.cond(lax.axis_index(cfg.axis_name) >= step, fns[0], fns[1], *operands)


def _flash(cfg: RingConfig, causal: bool, q, k, v, segs):
    """One block: flash_attention with its lse (q [b, r, h, d] against k, v [b, m, hkv, d]).

    flash_attention wants r <= m; a dense block with r = f m (the zig-zag's both query chunks
    against one K/V chunk) folds the f query chunks into the heads instead, which keeps the
    GQA grouping (each KV head serves f times as many query heads) and never copies K/V. Segment
    ids are per row, so with them the f chunks are attended one by one."""
    b, r, h, d = q.shape
    m, hkv = k.shape[1], k.shape[2]
    if r <= m:
        return flash_attention(q, k, v, causal=causal, segment_ids=segs, softmax_scale=cfg.scale,
                               return_lse=True, backend=cfg.backend)
    f = r // m
    if segs is not None:  # ids are per row, not per head: attend chunk by chunk instead
        parts = [_flash(cfg, causal, q[:, i * m:(i + 1) * m], k, v,
                        (segs[0][:, i * m:(i + 1) * m], segs[1])) for i in range(f)]
        return tuple(jnp.concatenate(x, axis=1) for x in zip(*parts))
    # [b, f m, hkv, g, d] -> [b, m, hkv, f, g, d] -> [b, m, f h, d]
    folded = q.reshape(b, f, m, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4, 5)
    folded = folded.reshape(b, m, f * h, d)
    out, lse = flash_attention(folded, k, v, causal=False, softmax_scale=cfg.scale,
                               return_lse=True, backend=cfg.backend)
    out = out.reshape(b, m, hkv, f, h // hkv, d).transpose(0, 3, 1, 2, 4, 5).reshape(b, r, h, d)
    lse = lse.reshape(b, m, hkv, f, h // hkv).transpose(0, 3, 1, 2, 4).reshape(b, r, h)
    return out, lse


def _part_ids(part: _Part, q_seg, kv_seg):
    return None if q_seg is None else (q_seg[:, part.q_rows], kv_seg[:, part.kv_rows])


def _visit_forward(cfg: RingConfig, part: _Part | None, q, q_seg, kv):
    """The partial (out float32 [b, n, h, d], lse [b, n, h]) of the local queries over one K/V
    block; rows the part leaves out get out = 0, lse = -inf."""
    b, n, h, d = q.shape
    out = jnp.zeros((b, n, h, d), jnp.float32)
    lse = jnp.full((b, n, h), -jnp.inf, jnp.float32)
    if part is None:
        return out, lse
    k, v, kv_seg = kv
    o_j, lse_j = _flash(cfg, part.causal, q[:, part.q_rows], k[:, part.kv_rows],
                        v[:, part.kv_rows], _part_ids(part, q_seg, kv_seg))
    return out.at[:, part.q_rows].set(o_j.astype(jnp.float32)), lse.at[:, part.q_rows].set(lse_j)


def _step_forward(cfg, step, q, q_seg, kv, out, lse):
    fns = [functools.partial(_visit_forward, cfg, p) for p in _parts(cfg, step, q.shape[1])]
    o_j, lse_j = _branch(cfg, step, fns, q, q_seg, kv)
    if out is None:
        return o_j, lse_j
    return merge_attention(out, lse, o_j, lse_j)


def _ring_forward(q, k, v, q_seg, cfg):
    # kv = (k, v, kv segment ids): what travels around the ring
    kv = (k, v, q_seg)
    out, lse = _step_forward(cfg, 0, q, q_seg, kv, None, None)
    if cfg.axis_size > 1:
        kv = _rotate(cfg, kv)

        def body(step, carry):
            out, lse, kv = carry
            arriving = _rotate(cfg, kv)  # independent of this step's compute: overlaps it
            out, lse = _step_forward(cfg, step, q, q_seg, kv, out, lse)
            return out, lse, arriving

        out, lse, kv = lax.fori_loop(1, cfg.axis_size - 1, body, (out, lse, kv))
        out, lse = _step_forward(cfg, cfg.axis_size - 1, q, q_seg, kv, out, lse)
    return out.astype(q.dtype), lse


def _ring_fwd(q, k, v, q_seg, cfg):
    out, lse = _ring_forward(q, k, v, q_seg, cfg)
    return (out, lse), (q, k, v, q_seg, out, lse)


def _visit_grads(cfg: RingConfig, part: _Part | None, q, q_seg, kv, out, lse, d_out, d_lse):
    """(dq, dk, dv) float32 of the global loss through one block, from the block's own VJP."""
    k, v, kv_seg = kv
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    if part is None:
        return dq, dk, dv
    rows, cols = part.q_rows, part.kv_rows

    segs = _part_ids(part, q_seg, kv_seg)
    (o_j, lse_j), vjp = jax.vjp(lambda a, b_, c: _flash(cfg, part.causal, a, b_, c, segs),
                                q[:, rows], k[:, cols], v[:, cols])
    lse_all = lse[:, rows]
    finite = jnp.isfinite(lse_all)
    w = jnp.where(finite, jnp.exp(lse_j - jnp.where(finite, lse_all, 0.0)), 0.0)  # [b, r, h]
    g_out = d_out[:, rows].astype(jnp.float32)
    d_o = (w[..., None] * g_out).astype(o_j.dtype)
    delta = jnp.sum(g_out * (o_j.astype(jnp.float32) - out[:, rows].astype(jnp.float32)), -1)
    d_lse_j = w * (delta + d_lse[:, rows])
    g_q, g_k, g_v = vjp((d_o, d_lse_j))
    return (dq.at[:, rows].set(g_q.astype(jnp.float32)),
            dk.at[:, cols].set(g_k.astype(jnp.float32)),
            dv.at[:, cols].set(g_v.astype(jnp.float32)))


def _step_grads(cfg, step, q, q_seg, kv, res, acc):
    fns = [functools.partial(_visit_grads, cfg, p) for p in _parts(cfg, step, q.shape[1])]
    g = _branch(cfg, step, fns, q, q_seg, kv, *res)
    return tuple(a + b for a, b in zip(acc, g))


def _ring_bwd(cfg, residuals, cotangents):
    q, k, v, q_seg, out, lse = residuals
    d_out, d_lse = cotangents
    res = (out, lse, d_out, d_lse)
    kv = (k, v, q_seg)
    dq = jnp.zeros(q.shape, jnp.float32)
    dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, *dkv = _step_grads(cfg, 0, q, q_seg, kv, res, (dq, *dkv))
    if cfg.axis_size > 1:
        # dk/dv accumulators travel with the K/V block they belong to
        kv, dkv = _rotate(cfg, (kv, tuple(dkv)))

        def body(step, carry):
            dq, dkv, kv = carry
            arriving = _rotate(cfg, kv)
            dq, *dkv = _step_grads(cfg, step, q, q_seg, kv, res, (dq, *dkv))
            return dq, _rotate(cfg, tuple(dkv)), arriving

        dq, dkv, kv = lax.fori_loop(1, cfg.axis_size - 1, body, (dq, dkv, kv))
        dq, *dkv = _step_grads(cfg, cfg.axis_size - 1, q, q_seg, kv, res, (dq, *dkv))
        dkv = _rotate(cfg, tuple(dkv))  # the last hop brings each accumulator home
    dk, dv = dkv
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)
