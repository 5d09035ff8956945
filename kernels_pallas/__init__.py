"""Pallas kernels as pure functions on arrays (attention, long convolutions, quantized matmul).

Each op is a folder with a public function, a plain-jnp reference, an XLA path and Pallas lowerings
for GPU and, for attention and quant_matmul, TPU (fftconv runs its XLA path on a TPU). This
package imports only jax.
"""

from kernels_pallas.attention import (flash_attention, merge_attention, paged_decode_attention,
                                      ragged_paged_attention, tile_fraction)
from kernels_pallas.fftconv import fftconv
from kernels_pallas.quant_matmul import QuantizedWeight, quant_matmul

__all__ = ["QuantizedWeight", "fftconv", "flash_attention", "merge_attention",
           "paged_decode_attention", "quant_matmul", "ragged_paged_attention", "tile_fraction"]
