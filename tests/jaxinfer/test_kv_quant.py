"""int8 K/V: round-trip error within half a scale step; attention with int8 K/V within a bound
derived from it.

Oracle: float32 attention (`flash_attention(backend="reference")`) on the unquantized K/V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models.kv_quant import dequantize_kv, quantize_kv
from kernels_pallas import flash_attention

# x_hat = q * scale rounds in float32 at magnitudes up to 127 * scale: 127 * 2**-24 * scale, i.e.
# up to 1.5e-5 of scale / 2; bfloat16 inputs hit exact halfway points x / scale = n + 0.5 often
ROUNDING_SLACK = 2e-5


def normal(seed, *shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_error_is_at_most_half_a_scale_step(dtype):
    x = normal(0, 2, 33, 4, 64) * normal(1, 2, 33, 4, 1, scale=5.0)  # per-vector magnitudes vary
    x = x.at[0, 3, 1].set(0.0).astype(dtype)  # an all-zero vector
    values, scale = quantize_kv(x)
    assert values.dtype == jnp.int8 and values.shape == x.shape
    assert scale.dtype == jnp.float32 and scale.shape == x.shape[:-1]
    assert float(scale[0, 3, 1]) == 0.0
    error = jnp.abs(dequantize_kv(values, scale) - x.astype(jnp.float32))
    assert bool(jnp.all(error <= scale[..., None] / 2 * (1 + ROUNDING_SLACK)))
    # the largest element of every vector maps to +-127: the full int8 range is used
    assert bool(jnp.all((jnp.max(jnp.abs(values.astype(jnp.int32)), -1) == 127) | (scale == 0)))


def test_attention_with_int8_kv_is_within_the_derived_bound():
    """out' - out = sum_j p'_j dv_j + sum_j (p'_j - p_j) v_j. With |dv| <= s_v / 2 and every
    score moved by at most E = ||q||_1 max s_k / 2 / sqrt(D), p'_j / p_j lies in
    [e^-2E, e^2E], so |out' - out| <= max s_v / 2 + (e^2E - 1) max|v| per query row and head."""
    batch, t, s, hq, hkv, d = 2, 8, 128, 8, 2, 64
    q, k, v = normal(2, batch, t, hq, d), normal(3, batch, s, hkv, d), normal(4, batch, s, hkv, d)
    k_int8, k_scale = quantize_kv(k)
    v_int8, v_scale = quantize_kv(v)
    attend = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, backend="reference"))
    exact = attend(q, k, v)
    approx = attend(q, dequantize_kv(k_int8, k_scale), dequantize_kv(v_int8, v_scale))

    group = hq // hkv
    max_sk = jnp.repeat(k_scale.max(axis=1), group, axis=-1)  # [batch, Hq]
    max_sv = jnp.repeat(v_scale.max(axis=1), group, axis=-1)
    max_v = jnp.repeat(jnp.abs(v).max(axis=(1, 3)), group, axis=-1)
    e = jnp.abs(q).sum(-1) * max_sk[:, None] / 2 / np.sqrt(d)  # [batch, T, Hq]
    bound = max_sv[:, None] / 2 + jnp.expm1(2 * e) * max_v[:, None]
    error = jnp.abs(approx - exact).max(-1)  # [batch, T, Hq]
    assert bool(jnp.all(error <= bound))
    # in practice well below the worst case: measured max abs error 6.3e-3 on outputs up to 0.64
    assert float(error.max()) < 0.02


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="float"):
        quantize_kv(jnp.zeros((2, 3, 4, 5), jnp.int32))
    with pytest.raises(ValueError, match="int8"):
        dequantize_kv(jnp.zeros((2, 3, 4, 5), jnp.float32), jnp.zeros((2, 3, 4)))
