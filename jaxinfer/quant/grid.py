"""Uniform quantization grids (GPTQ's quantizer): fit scale/zero, quantize, dequantize.

A grid maps a float ``w`` to an integer ``q = clamp(round(w / s) + z, 0, maxq)`` and back to
``s * (q - z)``, with ``maxq = 2**bits - 1``. Zero is always representable: the range is
``[min(0, min w), max(0, max w)]``. Symmetric grids use ``xmax = max(|xmin|, xmax)``,
``xmin = -xmax`` and ``z = (maxq + 1) / 2`` (8 at 4 bits); asymmetric ``z = round(-xmin / s)``.
An all-zero slice gets the range [-1, 1] so its scale stays finite. All math in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_finite_weight(w) -> None:
    """ValueError unless every value of the weight ``w`` is finite, for RTN and GPTQ alike: a NaN
    or Inf has no grid point (its group's scale turns NaN or Inf, and the whole group decodes to
    garbage). A traced ``w`` (under jit) is trusted."""
    if isinstance(w, jax.core.Tracer):
        return
    bad = int(w.size - jnp.count_nonzero(jnp.isfinite(w)))
    if bad:
        raise ValueError(f"the weight must be finite; got {bad} NaN or Inf value(s) in w "
                         f"{list(w.shape)}")


def fit_grid(w: jax.Array, bits: int, sym: bool) -> tuple[jax.Array, jax.Array]:
    """Fit one grid per column over the rows of ``w`` [rows, N] -> (scale [N] f32, zero [N] f32).

    The zero is an integer-valued float (in [0, maxq]).
    ``bits`` and ``sym`` may be traced scalars.
    """
    maxq = 2.0 ** bits - 1
    w = w.astype(jnp.float32)
    xmin = jnp.minimum(jnp.min(w, axis=0), 0.0)
    xmax = jnp.maximum(jnp.max(w, axis=0), 0.0)
    sym_max = jnp.maximum(-xmin, xmax)
    xmin = jnp.where(sym & (xmin < 0), -sym_max, xmin)
    xmax = jnp.where(sym, sym_max, xmax)
    empty = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(empty, -1.0, xmin)
    xmax = jnp.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = jnp.where(sym, (maxq + 1) / 2, jnp.round(-xmin / scale))
    return scale, zero


def fit_group_grids(w: jax.Array, bits, group_size: int, sym: bool):
    """Grids for consecutive row groups of ``w`` [K, N] -> (scales, zeros) f32 [K // G, N].

    ``bits`` is one width for all groups or a per-group array [K // G] (mixed 2/4-bit).
    ``group_size`` -1 means one group (per output channel). ``K % G == 0`` is the caller's check.
    """
    k, n = w.shape
    g = k if group_size == -1 else group_size
    group_bits = jnp.broadcast_to(jnp.asarray(bits, jnp.float32), (k // g,))  # [groups]
    return jax.vmap(lambda blk, b: fit_grid(blk, b, sym))(w.reshape(k // g, g, n), group_bits)


def quantize_to_grid(w, scale, zero, bits: int) -> jax.Array:
    """Integers (as float32) ``clamp(round(w / s) + z, 0, maxq)``; scale/zero broadcast to w."""
    return jnp.clip(jnp.round(w.astype(jnp.float32) / scale) + zero, 0, 2.0 ** bits - 1)


def dequantize_from_grid(q, scale, zero) -> jax.Array:
    return scale * (q - zero)
