"""Quantized matmul in plain jnp, dequantizing per group with scales applied late.

Algorithm: gather ``x[..., perm]`` (act-order) so groups are contiguous, view x as
[M, groups, G] and the integers as [groups, G, N]; per group compute ``x_g @ (q_g - z_g)`` in the
activation dtype with float32 accumulation (``q - z`` is an exact small integer in bf16 and f32),
multiply by the group's float32 scales and sum over groups. XLA fuses the unpack and the zero
subtraction into the contraction's operand; no float copy of the weight is kept.
Memory: the [M, groups, N] float32 partial products (small at decode-sized M).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.quant_matmul.weight import QuantizedWeight


@jax.jit
def quant_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [M, K] (float32 / bfloat16 / float16) -> float32 [M, N]."""
    k, n = w.shape
    g = w.group_size
    if w.perm is not None:
        x = jnp.take(x, w.perm, axis=-1)
    if x.dtype != jnp.float32 and jax.default_backend() == "cpu":
        # XLA:CPU has no 16-bit x 16-bit -> f32 batched dot; the upcast is exact.
        x = x.astype(jnp.float32)
    q = w.unpack_storage().reshape(w.num_groups, g, n)  # [groups, G, N] int32
    wq = (q - w.zeros[:, None, :]).astype(x.dtype)  # exact integers
    xg = x.reshape(x.shape[0], w.num_groups, g)  # [M, groups, G]
    # HIGHEST keeps f32 inputs exact on GPU/TPU; 16-bit inputs are exact in one pass anyway.
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    partial = jnp.einsum("mgk,gkn->mgn", xg, wq, preferred_element_type=jnp.float32,
                         precision=precision)
    return jnp.einsum("mgn,gn->mn", partial, w.scales.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
