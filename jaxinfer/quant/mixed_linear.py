"""``MixedQuantizedLinear``: a decoder linear layer holding a mixed 2/4-bit weight.

Its two parts are ordinary ``QuantizedLinear`` children named ``high`` and ``low`` (no bias), so
their packed arrays are ``QuantParam`` variables sharded like any quantized layer's; the layer
itself holds the row permutation and the bias, and runs one ``quant_matmul`` on the assembled
``MixedQuantizedWeight``. An HF GPTQ checkpoint has one bit width per layer, so
``jaxinfer.checkpoint.gptq_config`` refuses modules named ``<layer>.high`` / ``<layer>.low``
(``MIXED_PART_NAMES``) instead of writing a checkpoint that no reader understands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.models.layers import param
from jaxinfer.quant.linear import QuantizedLinear, QuantParam, quantized_forward
from kernels_pallas.quant_matmul import MixedQuantizedWeight

MIXED_PART_NAMES = ("high", "low")


class MixedQuantizedLinear(nnx.Module):
    """y = quant_matmul(x, w) (+ bias) for a ``MixedQuantizedWeight`` w [in, out]."""

    def __init__(self, weight: MixedQuantizedWeight, bias: jax.Array | None, *,
                 axes: tuple[str, str], dtype: jnp.dtype, backend: str = "auto"):
        def part(w):
            return None if w is None else QuantizedLinear(w, None, axes=axes, dtype=dtype,
                                                          backend=backend)

        self.high, self.low = part(weight.high), part(weight.low)  # [K_high, N], [K_low, N]
        self.perm = QuantParam(weight.perm, logical_axes=(None,))  # [K] int32
        self.shape = weight.shape
        self.bias = None if bias is None else param(jnp.asarray(bias), axes[1:])
        self.dtype = dtype
        self.backend = backend

    @property
    def weight(self) -> MixedQuantizedWeight:
        return MixedQuantizedWeight(
            high=None if self.high is None else self.high.weight,
            low=None if self.low is None else self.low.weight,
            perm=self.perm[...], shape=self.shape)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        return quantized_forward(self, x)
