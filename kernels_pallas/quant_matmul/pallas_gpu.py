"""Quantized matmul as a Pallas kernel for NVIDIA GPUs (Triton lowering; ``interpret=True`` on CPU).

Algorithm. Grid (M blocks, N blocks). A program owns one [block_m, block_n] float32 accumulator
and loops over the ``Kw / block_k`` row blocks of the planar packed weight (see ``weight.py``:
slot ``j`` of word row ``r`` is storage row ``j * Kw + r``). Per row block it loads one
[block_k, block_n] tile of int32 words once, and for each of the ``vpw`` slots (a static loop):

* extracts the slot with a shift and mask -> [block_k, block_n] integers, subtracts the group's
  zeros (one [1, block_n] row: ``block_k`` divides the group size, so a slot's rows never straddle
  two groups) and casts to the activation dtype (exact: |q - z| <= 256);
* loads the matching contiguous [block_m, block_k] slice of x (columns ``j * Kw + r0 ...``);
* accumulates ``dot(x, q - z)`` in float32 (IEEE products for float32 x, not TF32) and
  multiplies it by the group's float32 scales (scales applied late, per group, so the MXU /
  tensor cores see raw integers).

Memory touched per program: its x rows (each element once), the packed weight column block
(each word once, reused for all ``vpw`` slots), and one scale and zero row per (slot, row block).
Tiles are powers of two >= 16 as Triton requires; the wrapper pads M and N and slices the result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.backend import triton_compiler_params
from kernels_pallas.quant_matmul.weight import (QuantizedWeight, dot_precision, slot_bits,
                                                tiled_operands, values_per_word)


def _kernel(x_ref, qw_ref, s_ref, z_ref, o_ref, *, kw, block_k, group_size, sb, vpw):
    # x_ref [bm, K]; qw_ref [Kw, bn] int32; s_ref, z_ref [groups, bn]; o_ref [bm, bn]
    bm, bn = o_ref.shape
    mask = (1 << sb) - 1

    def body(rb, acc):
        r0 = rb * block_k
        words = qw_ref[pl.ds(r0, block_k), :]  # [block_k, bn] int32
        for j in range(vpw):
            row0 = j * kw + r0  # first storage row of this slot's run
            g = row0 // group_size
            q = lax.shift_right_logical(words, jnp.int32(sb * j)) & mask if j else words & mask
            z = z_ref[pl.ds(g, 1), :]  # [1, bn]
            s = s_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, bn]
            xs = x_ref[:, pl.ds(row0, block_k)]  # [bm, block_k]
            wq = (q - z).astype(xs.dtype)
            acc = acc + jnp.dot(xs, wq, preferred_element_type=jnp.float32,
                                precision=dot_precision(xs.dtype)) * s
        return acc

    acc = lax.fori_loop(0, kw // block_k, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret"))
def quant_matmul(x: jax.Array, w: QuantizedWeight, *, block_m: int, block_n: int, block_k: int,
                 interpret: bool) -> jax.Array:
    """x [M, K] -> float32 [M, N]. ``block_k`` must divide ``Kw`` and the group size (checked
    by the caller)."""
    k, n = w.shape
    m = x.shape[0]
    sb, vpw = slot_bits(w.bits), values_per_word(w.bits)
    kw = k // vpw
    x, qw, scales, zeros = tiled_operands(x, w, block_m, block_n)
    m_pad, n_pad = x.shape[0], qw.shape[1]
    groups = scales.shape[0]
    kernel = functools.partial(_kernel, kw=kw, block_k=block_k, group_size=w.group_size, sb=sb,
                               vpw=vpw)
    out = pl.pallas_call(
        kernel,
        grid=(m_pad // block_m, n_pad // block_n),
        in_specs=[
            pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
            pl.BlockSpec((kw, block_n), lambda i, j: (0, j)),
            pl.BlockSpec((groups, block_n), lambda i, j: (0, j)),
            pl.BlockSpec((groups, block_n), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), jnp.float32),
        interpret=interpret,
        compiler_params=triton_compiler_params(num_warps=4, num_stages=3, interpret=interpret),
        name="quant_matmul",
    )(x, qw, scales, zeros)
    return out[:m, :n]
