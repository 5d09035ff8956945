"""Mixed 2/4-bit quantization: argument checks, choosing the 4-bit groups, per-group bit widths.

A mixed quantizer (``bits=(2, 4)``) keeps a fraction ``high_fraction`` of the groups (runs of
``group_size`` input rows, in the order the quantizer forms groups) at 4 bits and stores the rest
at 2 bits (Li et al., arXiv 2311.16442). Which groups: those that 2 bits would hurt most, by

* ``"range"``: the group's weight range (max - min over its rows), averaged over output columns;
  the 2-bit step, hence the rounding error, grows with it. Needs only the weight.
* ``"hessian"``: the group's 2-bit RTN error weighted by the Hessian diagonal,
  ``sum_k H_kk * sum_n (w_kn - rtn2(w)_kn)^2`` — the layer-output error the group would cause if
  inputs were uncorrelated. Needs the layer Hessian.

The number of 4-bit groups is rounded so that both parts of the ``MixedQuantizedWeight`` are whole
packed words (their row counts multiples of 16); ``MixedQuantizedWeight.high_fraction`` reports
the fraction actually kept.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config_checks import is_real
from jaxinfer.quant.grid import dequantize_from_grid, fit_group_grids, quantize_to_grid
from kernels_pallas.quant_matmul import (MIXED_BITS, SUPPORTED_BITS, MixedQuantizedWeight,
                                         QuantizedWeight)

CRITERIA = ("range", "hessian")
DEFAULT_HIGH_FRACTION = 0.25
DEFAULT_CRITERION = "range"


def check_mixed_args(bits, group_size, high_fraction, criterion) -> bool:
    """Validate ``bits`` (one of ``SUPPORTED_BITS`` or the pair ``(2, 4)``) with the mixed-only
    arguments; returns whether ``bits`` is mixed. ``group_size`` is otherwise checked by
    ``check_quant_params``; mixed bits need real groups."""
    if isinstance(bits, (tuple, list)):
        if tuple(bits) != MIXED_BITS:
            raise ValueError(f"mixed bits must be (low, high) = {MIXED_BITS}; got {bits!r}")
        if group_size == -1:
            raise ValueError("mixed bits=(2, 4) choose a width per group; group_size must be a "
                             "positive int, got -1 (per channel: one group per layer)")
        if high_fraction is not None and not (is_real(high_fraction)
                                              and 0 <= high_fraction <= 1):
            raise ValueError(f"high_fraction must be a number in [0, 1]; got {high_fraction!r}")
        if criterion is not None and criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}; got {criterion!r}")
        return True
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} or the mixed pair {MIXED_BITS}; "
                         f"got {bits!r}")
    if high_fraction is not None or criterion is not None:
        raise ValueError(f"high_fraction and criterion apply only to mixed bits={MIXED_BITS}; got "
                         f"bits={bits!r}, high_fraction={high_fraction!r}, "
                         f"criterion={criterion!r}")
    return False


def packing_bits(bits) -> int:
    """The narrowest stored width of ``bits`` (validated): its packing constrains K most."""
    return MIXED_BITS[0] if isinstance(bits, (tuple, list)) else bits


def high_group_count(num_groups: int, group_size: int, high_fraction: float) -> int:
    """Groups to keep at 4 bits: ``high_fraction * num_groups`` rounded (half up) to a multiple of
    ``16 / gcd(G, 16)``, so that both parts hold whole words (rows a multiple of 16, the 2-bit
    word; K itself is one, so the 2-bit part's row count is then one too)."""
    step = 16 // math.gcd(group_size, 16)
    return min(num_groups, step * math.floor(high_fraction * num_groups / step + 0.5))


@functools.partial(jax.jit, static_argnames="group_size")
def _range_scores(w: jax.Array, group_size: int) -> jax.Array:
    """w [K, N] -> [groups] mean over columns of each group's range (max - min over its rows)."""
    k, n = w.shape
    wg = w.reshape(k // group_size, group_size, n)  # [groups, G, N]
    return jnp.mean(jnp.max(wg, axis=1) - jnp.min(wg, axis=1), axis=-1)


@functools.partial(jax.jit, static_argnames=("group_size", "sym"))
def _hessian_scores(w: jax.Array, hessian: jax.Array, group_size: int, sym: bool) -> jax.Array:
    """w [K, N], hessian [K, K] -> [groups] Hessian-diagonal-weighted squared 2-bit RTN error."""
    k, n = w.shape
    h_diag = jnp.diag(hessian).astype(jnp.float32)  # [K]
    low = MIXED_BITS[0]
    scales, zeros = fit_group_grids(w, low, group_size, sym)  # [groups, N]
    rows = jnp.arange(k) // group_size
    q = quantize_to_grid(w, scales[rows], zeros[rows], low)
    err = (w - dequantize_from_grid(q, scales[rows], zeros[rows])) ** 2  # [K, N]
    return jnp.sum((h_diag[:, None] * err).reshape(k // group_size, group_size * n), axis=-1)


def select_high_groups(w, high_fraction: float, group_size: int, *, criterion: str = "range",
                       hessian=None, sym: bool = True) -> np.ndarray:
    """Which groups of ``w`` [K, N] to keep at 4 bits -> bool [K // group_size].

    Groups are runs of ``group_size`` consecutive rows of ``w`` (pass the rows permuted when the
    quantizer groups them in another order). The ``high_group_count`` highest-scoring groups are
    chosen (ties: the earlier group); scores per ``criterion`` as in the module docstring,
    ``hessian`` [K, K] required for "hessian", ``sym`` the grid the 2-bit error is measured on.
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D [K, N]; got shape {list(w.shape)}")
    k = w.shape[0]
    check_mixed_args(MIXED_BITS, group_size, high_fraction, criterion)
    if not isinstance(group_size, int) or group_size <= 0 or k % group_size:
        raise ValueError(f"group_size must be a positive int dividing K={k}; got {group_size!r}")
    if criterion == "hessian":
        if hessian is None:
            raise ValueError("criterion='hessian' needs the layer hessian [K, K]; got None")
        hessian = jnp.asarray(hessian)
        if hessian.shape != (k, k):
            raise ValueError(f"hessian must be [K, K] = [{k}, {k}]; got {list(hessian.shape)}")
        scores = _hessian_scores(w, hessian, group_size, bool(sym))
    else:
        scores = _range_scores(w, group_size)
    num_groups = k // group_size
    order = np.argsort(-np.asarray(scores), kind="stable")
    high = np.zeros(num_groups, bool)
    high[order[:high_group_count(num_groups, group_size, high_fraction)]] = True
    return high


def group_bit_widths(w, bits, group_size: int, *, sym: bool, high_fraction: float | None,
                     criterion: str | None, hessian=None) -> tuple[np.ndarray, np.ndarray | None]:
    """(bit width of each group of ``w``'s rows, float32 [groups]; the 4-bit mask [groups] or
    None when ``bits`` is one width). ``bits`` etc. were checked by ``check_mixed_args``; None
    takes ``DEFAULT_HIGH_FRACTION`` / ``DEFAULT_CRITERION``."""
    k = w.shape[0]
    g = k if group_size == -1 else group_size
    if not isinstance(bits, (tuple, list)):
        return np.full(k // g, bits, np.float32), None
    high = select_high_groups(
        w, DEFAULT_HIGH_FRACTION if high_fraction is None else high_fraction, g,
        criterion=criterion or DEFAULT_CRITERION, hessian=hessian, sym=sym)
    low_bits, high_bits = MIXED_BITS
    return np.where(high, high_bits, low_bits).astype(np.float32), high


def packed_weight(q, scales, zeros, *, bits, group_size: int, high: np.ndarray | None,
                  g_idx=None) -> QuantizedWeight | MixedQuantizedWeight:
    """Pack a quantizer's integers q [K, N] (original row order) with scales and zeros
    [groups, N]: a ``QuantizedWeight`` for one width, a ``MixedQuantizedWeight`` for mixed bits
    (``high`` the 4-bit group mask in ``g_idx`` numbering)."""
    if high is None:
        return QuantizedWeight.from_ints(q, scales, zeros, bits=bits, group_size=group_size,
                                         g_idx=g_idx)
    return MixedQuantizedWeight.from_ints(q, scales, zeros, high, group_size=group_size,
                                          g_idx=g_idx)
