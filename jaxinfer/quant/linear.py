"""``QuantizedLinear``: a decoder linear layer holding a packed ``QuantizedWeight``.

``quant.model.quantize`` and GPTQ checkpoint loading put it where a float ``models.layers.Linear``
was; the decoders call it like any layer (``column_parallel`` / ``row_parallel`` send only float
``Linear`` layers through the sharded matmuls), so ``models`` never names it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.models.layers import param
from kernels_pallas.quant_matmul import QuantizedWeight, quant_matmul


def quantized_forward(layer: nnx.Module, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
    """quant_matmul(x, layer.weight) (+ layer.bias) in the layer's compute dtype: the forward of
    ``QuantizedLinear`` and ``MixedQuantizedLinear`` alike."""
    y = quant_matmul(x.astype(layer.dtype), layer.weight, backend=layer.backend)
    if layer.bias is not None:
        y = y + layer.bias[...].astype(layer.dtype)
    return y


class QuantParam(nnx.Variable):
    """Packed weight state of a ``QuantizedLinear`` (integers, scales, zeros, perm): not an
    ``nnx.Param``, so optimizers and float-checkpoint writers that filter on Param skip it."""


class QuantizedLinear(nnx.Module):
    """y = quant_matmul(x, w) (+ bias) for a packed ``QuantizedWeight`` w [in, out].

    The weight's arrays are ``QuantParam`` variables (sharded along the output axis, like the
    float kernel; packed input rows stay replicated) and its bits / group size / shape are static
    attributes, so the layer survives ``nnx.split``/``merge`` and ``jax.jit``. The bias stays float.
    """

    def __init__(self, weight: QuantizedWeight, bias: jax.Array | None, *, axes: tuple[str, str],
                 dtype: jnp.dtype, backend: str = "auto"):
        out_axes = (None, axes[1])
        self.qweight = QuantParam(weight.qweight, logical_axes=out_axes)  # [K / vpw, N] int32
        self.scales = QuantParam(weight.scales, logical_axes=out_axes)  # [groups, N]
        self.zeros = QuantParam(weight.zeros, logical_axes=out_axes)  # [groups, N] int32
        self.perm = None if weight.perm is None else QuantParam(weight.perm, logical_axes=(None,))
        self.bits, self.group_size, self.shape = weight.bits, weight.group_size, weight.shape
        self.bias = None if bias is None else param(jnp.asarray(bias), axes[1:])
        self.dtype = dtype
        self.backend = backend

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            qweight=self.qweight[...], scales=self.scales[...], zeros=self.zeros[...],
            perm=None if self.perm is None else self.perm[...], bits=self.bits,
            group_size=self.group_size, shape=self.shape)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        return quantized_forward(self, x)
