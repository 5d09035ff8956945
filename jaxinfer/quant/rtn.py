"""Round-to-nearest (RTN) weight quantization: the baseline GPTQ is measured against."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinfer.quant.grid import fit_group_grids, quantize_to_grid
from kernels_pallas.quant_matmul import QuantizedWeight, check_quant_params


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym"))
def _rtn(w, *, bits, group_size, sym):
    k, n = w.shape
    scales, zeros = fit_group_grids(w, bits, group_size, sym)  # [groups, N]
    groups = jnp.arange(k) // (k if group_size == -1 else group_size)
    q = quantize_to_grid(w, scales[groups], zeros[groups], bits)
    return q.astype(jnp.int32), scales, zeros.astype(jnp.int32)


def quantize_rtn(w, bits: int = 4, group_size: int = 128, sym: bool = True) -> QuantizedWeight:
    """Quantize a [K, N] weight (Linear kernel layout: [in, out]) to the nearest grid point.

    Groups are runs of ``group_size`` consecutive input rows (-1: one group per output column).
    """
    w = jnp.asarray(w)
    check_quant_params(w.shape, bits, group_size)
    q, scales, zeros = _rtn(w, bits=bits, group_size=group_size, sym=bool(sym))
    return QuantizedWeight.from_ints(q, scales, zeros, bits=bits, group_size=group_size)
