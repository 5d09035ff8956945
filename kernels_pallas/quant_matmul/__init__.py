"""Quantized matmul: ``quant_matmul(x, w)`` for a packed ``QuantizedWeight`` ``w`` [K, N] (or a
``MixedQuantizedWeight`` of 4-bit and 2-bit row groups: one matmul per part on any backend).

One function, several implementations (the pattern of ../shared/DESIGN.md):

* ``reference`` (``reference.py``): dequantize the weight to float32, then ``jnp.dot``. The oracle.
* ``xla`` (``xla.py``): dequantize the weight once in the compute dtype, then one dot.
* ``pallas`` (``pallas_gpu.py``): a Pallas kernel that unpacks slots, subtracts zeros and applies
  group scales inside, float32 accumulation; lowered through Triton on NVIDIA GPUs and run with
  ``interpret=True`` on CPU.
* ``pallas_tpu`` (``pallas_tpu.py``): the same computation tiled for Mosaic (K as a sequential
  grid axis, accumulator in VMEM); what ``pallas`` runs on a TPU, interpreted elsewhere. It needs
  K / vpw and the group size to share a multiple of 128 (or the group to span K / vpw).
* ``auto``: pallas on GPU and TPU, xla on CPU.

Derivatives: every backend has the same ``jax.custom_jvp``. The value runs the chosen backend; the
tangent is the exact derivative of the dequantize-then-dot computation in every float input:
``dy = dx @ W + x @ dW`` with ``W = scales * (q - zeros)`` and ``dW = dscales * (q - zeros)`` (minus
``scales * dzeros`` should zeros be float), in storage order (x gathered by ``perm``; no scatter).
The tangent is linear in (dx, dscales, dzeros), so reverse mode transposes it: ``jax.grad`` gives
d/dx and d/dscales, ``jax.jvp`` / ``jacfwd``, higher orders and ``vmap`` work on every backend.
The tangent dots run in x's dtype with float32 accumulation (HIGHEST for float32 x) and
materialize the [K, N] weight in that dtype, in reverse mode again in the backward pass (no
float weight is kept between the passes); a tangent that is zero (the packed integers, or scales
not being differentiated) costs nothing.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.backend import resolve_backend
from kernels_pallas.quant_matmul import pallas_gpu, pallas_tpu, reference, xla
from kernels_pallas.quant_matmul.mixed_weight import MIXED_BITS, MixedQuantizedWeight
from kernels_pallas.quant_matmul.weight import (SUPPORTED_BITS, QuantizedWeight,
                                                check_quant_params, pack_planar, unpack_planar,
                                                values_per_word)
from kernels_pallas.validation import check_arrays, check_block, check_float_dtype

__all__ = ["quant_matmul", "QuantizedWeight", "MixedQuantizedWeight", "BACKENDS",
           "DEFAULT_BLOCK_SIZES", "MIXED_BITS", "SUPPORTED_BITS", "check_quant_params",
           "pack_planar", "unpack_planar"]

BACKENDS = ("auto", "reference", "xla", "pallas", "pallas_tpu")
# Per-backend tile defaults. block_k counts packed word rows (block_k * vpw weight rows per tile).
# pallas (Triton): block_k is lowered to the largest power of two dividing both K / vpw and the
#   group size; block_n to N's next power of two (>= 16) when that is smaller.
# pallas_tpu (Mosaic): block_m is a cap (M rounded up to 8 sublanes when smaller), block_n falls
#   to one 128-lane tile when N < 256, and block_k comes from ``pallas_tpu.default_block_k`` (a
#   multiple of 128 dividing K / vpw and the group size, or all of K / vpw).
DEFAULT_BLOCK_SIZES = {"pallas": dict(block_m=16, block_n=128, block_k=64),
                       "pallas_tpu": dict(block_m=128, block_n=256)}


def _shared_pow2(kw: int, group_size: int) -> int:
    """The largest power of two dividing both K / vpw (``kw``) and the group size: the largest
    block_k the GPU kernel can take (its tiles are powers of two within one group)."""
    g = math.gcd(kw, group_size)
    return g & -g


def _check_blocks(block_m, block_n, block_k, *, triton: bool):
    """(block_m, block_n, block_k), each None or a positive int made a Python int; with
    ``triton`` (the GPU kernel's tiles) a power of two >= 16."""
    return tuple(check_block(name, value, pallas=triton, minimum=16)
                 for name, value in (("block_m", block_m), ("block_n", block_n),
                                     ("block_k", block_k)))


def quant_matmul(x: jax.Array, w: QuantizedWeight | MixedQuantizedWeight, *,
                 backend: str = "auto", block_m: int | None = None, block_n: int | None = None,
                 block_k: int | None = None) -> jax.Array:
    """y = x @ dequantize(w), with float32 accumulation.

    Args:
      x: [..., K] float32, bfloat16 or float16 activations.
      w: ``QuantizedWeight`` or ``MixedQuantizedWeight`` (2/4-bit groups; int2/int3-class
        storage) of shape (K, N). A mixed weight is one gather of x into its storage order and
        one quantized matmul per part (``mixed_weight.py``), each on the chosen backend.
      backend: "reference" | "xla" | "pallas" | "pallas_tpu" | "auto" (pallas on GPU and TPU,
        xla on CPU).
      block_m, block_n, block_k: pallas tiles (rows of x, output columns, packed word rows);
        None takes ``DEFAULT_BLOCK_SIZES``. Every backend refuses one that is neither None nor a
        positive int (reference and xla ignore them). On GPU they must be powers of two >= 16,
        and block_k must divide both K / vpw and the group size (vpw = 32 // slot bits; for a
        mixed weight, of each part).

    Returns:
      [..., N] in x's dtype (zeros for an empty batch). Differentiable, forward and reverse,
      in x and in the weight's float scales on every backend (see the module docstring).
    """
    if not isinstance(w, (QuantizedWeight, MixedQuantizedWeight)):
        raise TypeError(f"w must be a QuantizedWeight or MixedQuantizedWeight; got "
                        f"{type(w).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    check_arrays(x=x)
    if x.ndim < 1:
        raise ValueError(f"x must be an array [..., K]; got a scalar of shape {list(x.shape)}")
    check_float_dtype("x", x)
    k, n = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension must equal the weight's in_features K={k}; got x "
                         f"{list(x.shape)}")
    # Checked whatever the backend: "auto" resolves to xla on CPU and to a kernel on GPU/TPU,
    # so a bad block accepted here would fail only on another machine.
    block_m, block_n, block_k = _check_blocks(block_m, block_n, block_k, triton=False)
    lead = x.shape[:-1]
    if not math.prod(lead):  # an empty batch: the kernels' grids would have no programs
        return jnp.zeros((*lead, n), x.dtype)
    x2 = x.reshape(-1, k)  # [M, K]
    config = _Config(backend, block_m, block_n, block_k, x.dtype)
    if isinstance(w, QuantizedWeight):
        y = _matmul_2d(x2, w, config)
    else:
        # [M, K] in storage order: high rows, then low rows
        xs = jnp.take(x2, w.perm, axis=-1, unique_indices=True)
        y, start = 0.0, 0
        for part in w.parts:
            rows = part.shape[0]
            y = y + _matmul_2d(xs[:, start:start + rows], part, config)  # [M, N] float32
            start += rows
    return y.astype(x.dtype).reshape(*lead, n)


class _Config(NamedTuple):
    """Static arguments of ``_matmul_2d``: the backend, the checked blocks and x's dtype."""

    backend: str
    block_m: int | None
    block_n: int | None
    block_k: int | None
    dtype: jnp.dtype


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _matmul_2d(x2, w: QuantizedWeight, config: _Config):
    """x2 [M, K] (validated) @ w [K, N] -> float32 [M, N] on the resolved backend."""
    return _forward(x2, w, config)


def _matmul_2d_jvp(config: _Config, primals, tangents):
    """The backend's value and the dequantize-then-dot tangent (see the module docstring)."""
    x2, w = primals
    dx, dw = tangents
    y = _matmul_2d(x2, w, config)  # [M, N] float32
    return y, _tangent(x2, w, dx, dw.scales, dw.zeros)


def _is_zero(t) -> bool:
    """A symbolic zero tangent, or the float0 tangent of an integer leaf."""
    return (isinstance(t, jax.custom_derivatives.SymbolicZero)
            or getattr(t, "dtype", None) == jax.dtypes.float0)


def _tangent(x2, w: QuantizedWeight, dx, dscales, dzeros):
    """dy float32 [M, N] = dx @ W + x2 @ dW, dots in x2's dtype accumulating in float32."""
    dy = jnp.zeros((x2.shape[0], w.shape[1]), jnp.float32)
    if not _is_zero(dx):
        dy = dy + _dot_dequantized(dx, w, w.scales, w.zeros, x2.dtype, True)
    if not _is_zero(dscales):
        dy = dy + _dot_dequantized(x2, w, dscales, w.zeros, x2.dtype, True)
    if not _is_zero(dzeros):  # float zeros (from_ints stores int32, a hand-built weight may not)
        dy = dy - _dot_dequantized(x2, w, w.scales, dzeros, x2.dtype, False)
    return dy


# Rematerialized: reverse mode keeps the packed weight for the backward pass and dequantizes it
# again there, not a [K, N] float copy per layer (the size of a float model) from the forward.
@functools.partial(jax.checkpoint, static_argnums=(4, 5))
def _dot_dequantized(a, w: QuantizedWeight, scales, zeros, dtype, with_q: bool):
    """a [M, K] (original row order) @ V [K, N] -> float32 [M, N], with V in storage order
    ``(q - zeros) * scales`` (``with_q``) or ``zeros * scales`` (not), per row's group; a is
    gathered by ``w.perm`` (no scatter of V) and both operands are cast to ``dtype``."""
    groups = jnp.arange(w.shape[0]) // w.group_size  # [K] storage row -> group
    v = (w.unpack_storage() - zeros[groups]) if with_q else zeros[groups]  # [K, N]
    v = v.astype(jnp.float32) * scales.astype(jnp.float32)[groups]
    if w.perm is not None:
        a = jnp.take(a, w.perm, axis=-1, unique_indices=True)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return jnp.dot(a.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32,
                   precision=precision)


_matmul_2d.defjvp(_matmul_2d_jvp, symbolic_zeros=True)


def _forward(x2, w: QuantizedWeight, config: _Config):
    """``_matmul_2d``'s value: x2 [M, K] @ w [K, N] -> float32 [M, N]."""
    backend, block_m, block_n, block_k, _ = config
    k, n = w.shape
    impl, interpret = resolve_backend(backend, tpu_kernel=True)
    if backend == "auto" and not _kernel_takes(impl, interpret, w):
        impl = "xla"  # auto runs what the shape allows; an explicit "pallas" raises instead
    if impl == "reference":
        return reference.quant_matmul(x2, w)
    if impl == "xla":
        return xla.quant_matmul(x2, w)
    if impl == "pallas_tpu":
        return _tpu_matmul(x2, w, block_m, block_n, block_k, interpret)
    on_gpu = not interpret
    if on_gpu:  # quant_matmul made them None or positive ints; Triton tiles need powers of two
        block_m, block_n, block_k = _check_blocks(block_m, block_n, block_k, triton=True)
    defaults = DEFAULT_BLOCK_SIZES["pallas"]
    kw = k // values_per_word(w.bits)
    if block_k is None:
        block_k = min(defaults["block_k"], _shared_pow2(kw, w.group_size))
    if kw % block_k or w.group_size % block_k:
        raise ValueError(f"block_k must divide K / vpw = {kw} and group_size = "
                         f"{w.group_size}; got block_k={block_k}")
    if on_gpu and block_k < 16:
        raise ValueError(f"the pallas backend on GPU needs K / vpw = {kw} and group_size = "
                         f"{w.group_size} to share a power-of-two divisor >= 16; use "
                         f"backend='xla'")
    bm = block_m or defaults["block_m"]
    bn = block_n or min(defaults["block_n"], max(16, 1 << (n - 1).bit_length()))
    return pallas_gpu.quant_matmul(x2, w, block_m=bm, block_n=bn, block_k=block_k,
                                   interpret=interpret)


def _kernel_takes(impl: str, interpret: bool, w: QuantizedWeight) -> bool:
    """Whether the platform's kernel tiles this weight with default blocks (GPU: K / vpw and the
    group size share a power of two >= 16; TPU: see ``pallas_tpu.default_block_k``)."""
    kw = w.shape[0] // values_per_word(w.bits)
    if impl == "pallas_tpu":
        return pallas_tpu.default_block_k(kw, w.group_size) is not None
    if impl == "pallas" and not interpret:
        return _shared_pow2(kw, w.group_size) >= 16
    return True


def _tpu_matmul(x2, w: QuantizedWeight, block_m, block_n, block_k, interpret: bool):
    """The Mosaic kernel's tiles: block_m a multiple of 8, block_n a multiple of 128, block_k as
    ``DEFAULT_BLOCK_SIZES["pallas_tpu"]`` says unless given (blocks: None or positive ints)."""
    k, n = w.shape
    kw = k // values_per_word(w.bits)
    if block_k is None:
        block_k = pallas_tpu.default_block_k(kw, w.group_size)
        if block_k is None:
            raise ValueError(f"the TPU kernel needs K / vpw = {kw} and group_size = "
                             f"{w.group_size} to share a multiple of 128 (or the group to span "
                             f"K / vpw); use backend='xla'")
    if kw % block_k or w.group_size % block_k or (block_k % pallas_tpu.LANES and block_k != kw):
        raise ValueError(f"block_k must be a multiple of 128 (or K / vpw = {kw}) dividing K / vpw "
                         f"and group_size = {w.group_size}; got block_k={block_k}")
    defaults = DEFAULT_BLOCK_SIZES["pallas_tpu"]
    rows = -(-x2.shape[0] // pallas_tpu.SUBLANES) * pallas_tpu.SUBLANES  # M rounded up to 8
    bm = block_m or min(defaults["block_m"], rows)
    bn = block_n or (defaults["block_n"] if n >= defaults["block_n"] else pallas_tpu.LANES)
    if bm % pallas_tpu.SUBLANES or bn % pallas_tpu.LANES:
        raise ValueError(f"the TPU kernel needs block_m a multiple of 8 and block_n of 128; got "
                         f"block_m={bm}, block_n={bn}")
    return pallas_tpu.quant_matmul(x2, w, block_m=bm, block_n=bn, block_k=block_k,
                                   interpret=interpret)
