"""Quantized matmul in plain jnp: dequantize the weight once in the compute dtype, then one dot.

Algorithm: gather ``x[..., perm]`` (act-order) so that x's columns follow the weight's storage
order, build ``scales * (q - zeros)`` as a [K, N] weight in the compute dtype c (x's dtype; float32
on CPU, an exact upcast, as XLA:CPU lacks 16-bit dots into float32) and contract it with x in
float32 accumulation. Float32 x is exact (HIGHEST: no TF32 or bf16 passes on GPU/TPU), matching
``reference.py``; 16-bit x sees the weight rounded to c, as a float layer of that dtype holds it.

Memory: the [K, N] weight in c (``K * N * size(c)`` bytes whatever M; XLA may fuse its
elementwise dequantization into the dot) plus, on CPU, x's float32 copy. The per-group form this
replaced (``x_g @ (q_g - z_g)`` per group, scales applied late) kept the same [K, N] operand on
CPU and added [M, groups, N] float32 partial products: measured at 4096 x 4096, G = 128 (CPU,
``memory_analysis``), 65 against 64 MiB at M = 1 but 2 GiB against 64 MiB at M = 2048. Speed
(2048 x 2048, G = 128, float32, a loaded 2-core CPU, two sessions): no measurable difference at
M = 1 (medians 4-15 ms, within the run-to-run spread), 2-3.5x slower at M = 64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.quant_matmul.weight import QuantizedWeight


@jax.jit
def quant_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [M, K] (float32 / bfloat16 / float16) -> float32 [M, N]."""
    k, n = w.shape
    if w.perm is not None:
        x = jnp.take(x, w.perm, axis=-1, unique_indices=True)  # [M, K] in storage order
    if jax.default_backend() == "cpu":
        x = x.astype(jnp.float32)
    q = w.unpack_storage().reshape(w.num_groups, w.group_size, n)  # [groups, G, N] int32
    scales = w.scales.astype(jnp.float32)[:, None, :]  # [groups, 1, N]
    wd = ((q - w.zeros[:, None, :]) * scales).astype(x.dtype).reshape(k, n)  # [K, N] storage
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.dot(x, wd, preferred_element_type=jnp.float32, precision=precision)
