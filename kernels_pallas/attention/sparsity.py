"""``tile_fraction``: the share of attention's (block_q x block_k) score tiles that the kernels
compute under a mask, i.e. how much of the dense cost a causal, windowed or segmented mask leaves.

The API's own module, apart from ``tiling.py``: it validates its arguments as
``flash_attention`` does (``checks.py``), and ``checks`` imports ``BlockSizes`` from ``tiling``.
It counts tiles with the kernels' own loop bounds (``tiling.block_visibility``, ``loop_bounds``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.attention import checks
from kernels_pallas.attention.tiling import (DEFAULT_BLOCK_SIZES, MaskSpec, block_visibility,
                                             cdiv, default_block_sizes, loop_bounds, pad_to)


def tile_fraction(t: int, s: int, *, causal: bool = False, local_window=None, segment_ids=None,
                  block_q: int | None = None, block_k: int | None = None,
                  head_dim: int | None = None) -> float:
    """Fraction of the (block_q x block_k) tiles of a T x S score matrix that the kernels compute.

    ``local_window`` is ``(left, right)`` or an int (symmetric); ``segment_ids`` an int array
    [batch, S] (the queries are its last T positions) or a pair ([batch, T], [batch, S]); the
    fraction is averaged over the batch, each example counting its own tiles, as the Pallas
    kernels visit them. The xla path runs one loop for the whole batch over the union of the
    examples' tiles (``xla.py``): with segment ids that differ across the batch it may compute
    more than this average (the same fraction when they agree).
    block_q / block_k default to the Pallas GPU forward's tiles at ``head_dim`` (the rule
    ``flash_attention`` uses, ``default_block_sizes("pallas", head_dim)``: 128 x 64, halved to
    64 x 32 from a padded head dim of 256); head_dim None means a head dim up to 128. 1.0 means
    dense; the run time of the masked part of attention scales with this number. Invalid
    arguments raise ValueError/TypeError as ``flash_attention``'s do (T <= S, windows of ints
    >= 0, a side >= S unbounded, ids [batch, S]; blocks and head_dim any int >= 1).
    """
    window, q_seg, kv_seg = checks.check_tile_fraction(t, s, causal, local_window, segment_ids,
                                                       block_q, block_k, head_dim)
    defaults = (DEFAULT_BLOCK_SIZES["pallas_gpu"] if head_dim is None
                else default_block_sizes("pallas", head_dim))
    block_q = defaults.block_q if block_q is None else block_q
    block_k = defaults.block_k if block_k is None else block_k
    nq, nk = cdiv(t, block_q), cdiv(s, block_k)
    spec = MaskSpec(t, s, bool(causal), window, segment_ids is not None)
    batch = 1 if q_seg is None else q_seg.shape[0]
    return float(_computed_tiles(spec, block_q, block_k, q_seg, kv_seg)) / (batch * nq * nk)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _computed_tiles(spec: MaskSpec, block_q: int, block_k: int, q_seg, kv_seg):
    t_pad, s_pad = cdiv(spec.t, block_q) * block_q, cdiv(spec.s, block_k) * block_k
    if spec.segments:
        q_seg = pad_to(q_seg, 1, t_pad, mode="edge")
        kv_seg = pad_to(kv_seg, 1, s_pad, mode="edge")
    vis = block_visibility(spec, block_q, block_k, t_pad, s_pad, q_seg, kv_seg)
    lo, hi = loop_bounds(vis)
    return jnp.sum(hi - lo)
