"""Reference quantized matmul: dequantize the whole weight to float32, then one ``jnp.dot``.

The oracle for the other backends. Memory: materializes the [K, N] float32 weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.quant_matmul.weight import QuantizedWeight


@jax.jit
def quant_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [M, K] (any float dtype) -> float32 [M, N]."""
    return jnp.dot(x.astype(jnp.float32), w.dequantize(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
