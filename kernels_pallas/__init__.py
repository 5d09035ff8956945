"""Pallas kernels as pure functions on arrays (attention, long convolutions, quantized matmul).

Each op is a folder with a public function, a plain-jnp reference, an XLA path and Pallas lowerings
for GPU and TPU (see DESIGN.md). This package imports only jax.
"""

from kernels_pallas.attention import flash_attention, merge_attention, tile_fraction

__all__ = ["flash_attention", "merge_attention", "tile_fraction"]
