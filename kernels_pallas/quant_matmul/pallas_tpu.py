"""Quantized matmul as a Pallas kernel for TPUs (Mosaic lowering; ``interpret=True`` elsewhere).

Algorithm. Grid (M blocks, N blocks, K word-row blocks); the K axis is the innermost, sequential
("arbitrary") one, and a [block_m, block_n] float32 accumulator lives in VMEM scratch across it.
Step (i, j, r) loads one [block_k, block_n] tile of int32 words of the planar packed weight (see
``weight.py``: slot ``s`` of word row ``w`` is storage row ``s * Kw + w``) and, for each of the
``vpw`` slots (a static loop), extracts the slot with a shift and mask, subtracts the group's
zeros, multiplies by the matching x tile on the MXU in float32 accumulation (full float32
passes for float32 x) and applies the group's scales to the product (scales late: the MXU sees
raw integers). The output is written once, at the last K step.

Layout for Mosaic's block rule (the last two block dims divisible by (8, 128) or whole): x is
passed as [vpw, M, Kw] (x's storage-order columns split by slot), so the x tile of slot s is a
leading-axis index of a [vpw, block_m, block_k] block; block_k is a multiple of 128 (or all of
Kw) dividing both Kw and the group size, so a slot's rows in one tile lie in one group; scales
and zeros ([groups, N], 1/group_size of the weight) come whole per N block, and each step reads
one group row of them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.quant_matmul.weight import (QuantizedWeight, dot_precision, slot_bits,
                                                tiled_operands, values_per_word)

LANES = 128  # TPU vector lanes: the minor block dims are multiples of this
SUBLANES = 8  # and the second-minor ones multiples of this (float32)


def _kernel(x_ref, qw_ref, s_ref, z_ref, o_ref, acc_ref, *, kw, block_k, group_size, sb, vpw):
    # x_ref [vpw, bm, bk]; qw_ref [bk, bn] int32; s_ref, z_ref [groups, bn]; o_ref, acc_ref [bm, bn]
    r = pl.program_id(2)

    @pl.when(r == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    words = qw_ref[...]
    mask = (1 << sb) - 1
    acc = acc_ref[...]
    for s in range(vpw):
        # the group of this slot's rows in the tile (lax.div: jnp's floor division lowers
        # through sign, which Mosaic resolves per TPU generation, so only on a TPU)
        g = lax.div(s * kw + r * block_k, group_size)
        q = lax.shift_right_logical(words, jnp.int32(sb * s)) & mask if s else words & mask
        xs = x_ref[s]  # [bm, bk]
        wq = (q - z_ref[pl.ds(g, 1), :]).astype(jnp.float32).astype(xs.dtype)  # [bk, bn]
        scale = s_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, bn]
        acc = acc + jnp.dot(xs, wq, preferred_element_type=jnp.float32,
                            precision=dot_precision(xs.dtype)) * scale
    acc_ref[...] = acc

    @pl.when(r == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...]


def default_block_k(kw: int, group_size: int) -> int | None:
    """The largest tile of word rows (<= 512) that is a multiple of 128 dividing Kw and the group
    size, or all of Kw when it fits in one group; None when Mosaic's rule cannot be met."""
    for block_k in (512, 256, LANES):
        if kw % block_k == 0 and group_size % block_k == 0:
            return block_k
    return kw if group_size % kw == 0 else None


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret"))
def quant_matmul(x: jax.Array, w: QuantizedWeight, *, block_m: int, block_n: int, block_k: int,
                 interpret: bool) -> jax.Array:
    """x [M, K] -> float32 [M, N]. block_m a multiple of 8, block_n of 128, block_k from
    ``default_block_k`` (checked by the caller); M and N are padded to the tiles."""
    k, n = w.shape
    m = x.shape[0]
    sb, vpw = slot_bits(w.bits), values_per_word(w.bits)
    kw = k // vpw
    x, qw, scales, zeros = tiled_operands(x, w, block_m, block_n)
    m_pad, n_pad = x.shape[0], qw.shape[1]
    xs = x.reshape(m_pad, vpw, kw).transpose(1, 0, 2)  # [vpw, M, Kw]: slot s's storage rows
    groups = scales.shape[0]
    kernel = functools.partial(_kernel, kw=kw, block_k=block_k, group_size=w.group_size, sb=sb,
                               vpw=vpw)
    from jax.experimental.pallas import tpu as pltpu  # TPU dialect; importable on any jaxlib
    compiler_params = None if interpret else pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"))
    out = pl.pallas_call(
        kernel,
        grid=(m_pad // block_m, n_pad // block_n, kw // block_k),
        in_specs=[
            pl.BlockSpec((vpw, block_m, block_k), lambda i, j, r: (0, i, r)),
            pl.BlockSpec((block_k, block_n), lambda i, j, r: (r, j)),
            pl.BlockSpec((groups, block_n), lambda i, j, r: (0, j)),
            pl.BlockSpec((groups, block_n), lambda i, j, r: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, r: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), jnp.float32),
        scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
        interpret=interpret,
        compiler_params=compiler_params,
        name="quant_matmul_tpu",
    )(xs, qw, scales, zeros)
    return out[:m, :n]
