"""Round-to-nearest (RTN) weight quantization: the baseline GPTQ is measured against."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinfer.quant.grid import check_finite_weight, fit_group_grids, quantize_to_grid
from jaxinfer.quant.mixed import check_mixed_args, group_bit_widths, packed_weight, packing_bits
from kernels_pallas.quant_matmul import MixedQuantizedWeight, QuantizedWeight, check_quant_params


@functools.partial(jax.jit, static_argnames=("group_size", "sym"))
def _rtn(w, group_bits, *, group_size, sym):
    k, n = w.shape
    scales, zeros = fit_group_grids(w, group_bits, group_size, sym)  # [groups, N]
    groups = jnp.arange(k) // (k if group_size == -1 else group_size)
    q = quantize_to_grid(w, scales[groups], zeros[groups], group_bits[groups][:, None])
    return q.astype(jnp.int32), scales, zeros.astype(jnp.int32)


def quantize_rtn(w, bits: int | tuple[int, int] = 4, group_size: int = 128, sym: bool = True, *,
                 high_fraction: float | None = None, criterion: str | None = None,
                 hessian=None) -> QuantizedWeight | MixedQuantizedWeight:
    """Quantize a [K, N] weight (Linear kernel layout: [in, out]) to the nearest grid point.

    Groups are runs of ``group_size`` consecutive input rows (-1: one group per output column).
    ``bits``: 2, 3, 4, 8, or the pair (2, 4) for mixed 2/4-bit groups -> a
    ``MixedQuantizedWeight`` whose ``high_fraction`` of groups (default 0.25) are 4-bit, chosen by
    ``criterion`` "range" (default) or "hessian" (needs ``hessian`` [K, K]); see
    ``jaxinfer.quant.mixed``. A weight holding NaN or Inf raises ValueError, as in GPTQ.
    """
    w = jnp.asarray(w)
    mixed = check_mixed_args(bits, group_size, high_fraction, criterion)
    check_quant_params(w.shape, packing_bits(bits), group_size)
    check_finite_weight(w)
    if hessian is not None and not mixed:
        raise ValueError("hessian is used only to choose mixed bits=(2, 4) groups; got bits="
                         f"{bits!r}")
    group_bits, high = group_bit_widths(w, bits, group_size, sym=bool(sym),
                                        high_fraction=high_fraction, criterion=criterion,
                                        hessian=hessian)
    q, scales, zeros = _rtn(w, jnp.asarray(group_bits), group_size=group_size, sym=bool(sym))
    return packed_weight(q, scales, zeros, bits=bits, group_size=group_size, high=high)
