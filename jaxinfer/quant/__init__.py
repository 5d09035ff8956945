"""Weight quantization: round-to-nearest and GPTQ, producing packed ``QuantizedWeight``s (or, for
mixed 2/4-bit groups, ``MixedQuantizedWeight``s).

``QuantizedWeight`` and ``MixedQuantizedWeight`` are defined in ``kernels_pallas.quant_matmul`` (the
kernels take them and may import only jax) and re-exported here.
"""

from jaxinfer.quant.calibration import token_chunks
from jaxinfer.quant.gptq import gptq_quantize_layer
from jaxinfer.quant.grid import (dequantize_from_grid, fit_grid, fit_group_grids,
                                 quantize_to_grid)
from jaxinfer.quant.hessian import HessianState, accumulate_hessian, hessian_from_activations
from jaxinfer.quant.linear import QuantizedLinear
from jaxinfer.quant.mixed import select_high_groups
from jaxinfer.quant.mixed_linear import MixedQuantizedLinear
from jaxinfer.quant.model import quantize
from jaxinfer.quant.rtn import quantize_rtn
from kernels_pallas.quant_matmul import MixedQuantizedWeight, QuantizedWeight, quant_matmul

__all__ = [
    "HessianState",
    "MixedQuantizedLinear",
    "MixedQuantizedWeight",
    "QuantizedLinear",
    "QuantizedWeight",
    "accumulate_hessian",
    "dequantize_from_grid",
    "fit_grid",
    "fit_group_grids",
    "gptq_quantize_layer",
    "hessian_from_activations",
    "quant_matmul",
    "quantize",
    "quantize_rtn",
    "quantize_to_grid",
    "select_high_groups",
    "token_chunks",
]
