"""Weight quantization: round-to-nearest and GPTQ, producing packed ``QuantizedWeight``s.

``QuantizedWeight`` is defined in ``kernels_pallas.quant_matmul`` (the kernels take it and may
import only jax) and re-exported here.
"""

from jaxinfer.quant.calibration import token_chunks
from jaxinfer.quant.gptq import gptq_quantize_layer
from jaxinfer.quant.grid import (dequantize_from_grid, fit_grid, fit_group_grids,
                                 quantize_to_grid)
from jaxinfer.quant.hessian import HessianState, accumulate_hessian, hessian_from_activations
from jaxinfer.quant.model import quantize
from jaxinfer.quant.rtn import quantize_rtn
from kernels_pallas.quant_matmul import QuantizedWeight, quant_matmul

__all__ = [
    "HessianState",
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
    "token_chunks",
]
