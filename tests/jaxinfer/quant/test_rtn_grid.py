"""RTN and the quantization grid: values stay on the grid, error at most half a step."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.quant import QuantizedWeight, quantize_rtn

# Rounding to nearest moves a weight by at most half a step; the slack covers float32 rounding
# of w / s.
HALF_STEP_SLACK = 1e-5


def _weight(k=128, n=24, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(k, n)), jnp.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_at_most_half_a_step(bits, group_size, sym):
    w = _weight()
    qw = quantize_rtn(w, bits=bits, group_size=group_size, sym=sym)
    g = w.shape[0] if group_size == -1 else group_size
    step = np.asarray(qw.scales)[np.arange(w.shape[0]) // g]  # [K, N]
    err = np.abs(np.asarray(qw.dequantize()) - np.asarray(w))
    assert np.all(err <= 0.5 * step * (1 + HALF_STEP_SLACK) + 1e-7)
    q = np.asarray(qw.unpack())
    assert q.min() >= 0 and q.max() <= 2 ** bits - 1


def test_rtn_symmetric_zero_is_the_grid_midpoint():
    qw = quantize_rtn(_weight(), bits=4, group_size=32, sym=True)
    np.testing.assert_array_equal(np.asarray(qw.zeros), 8)


def test_rtn_all_zero_group_dequantizes_to_zero():
    w = _weight().at[:32].set(0.0)
    qw = quantize_rtn(w, bits=4, group_size=32, sym=False)
    np.testing.assert_array_equal(np.asarray(qw.dequantize())[:32], 0.0)
    assert np.all(np.isfinite(np.asarray(qw.scales)))


def test_quantized_weight_is_a_pytree_with_static_metadata():
    import jax
    qw = quantize_rtn(_weight(), bits=4, group_size=32)
    leaves, treedef = jax.tree.flatten(qw)
    assert len(leaves) == 3  # qweight, scales, zeros (perm None)
    again = jax.tree.unflatten(treedef, leaves)
    assert isinstance(again, QuantizedWeight) and again.bits == 4 and again.group_size == 32
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w: w.dequantize())(qw)),
                                  np.asarray(qw.dequantize()))


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=5), "bits must be one of"),
    (dict(group_size=48), "group_size must divide K"),
    (dict(group_size=0), "group_size must be a positive int or -1"),
])
def test_rtn_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_rtn(_weight(), **{"bits": 4, "group_size": 32, **kwargs})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rtn_refuses_a_non_finite_weight_as_gptq_does(bad):
    """RTN used to quantize a NaN/Inf weight silently (its group decoding to NaN); GPTQ refuses
    one, and both now share the check."""
    w = _weight().at[5, 3].set(bad)
    with pytest.raises(ValueError, match=r"the weight must be finite; got 1 NaN or Inf value\(s\) "
                                         r"in w \[128, 24\]"):
        quantize_rtn(w, bits=4, group_size=32)


@pytest.mark.parametrize("shape", [(0, 24), (128, 0)])
def test_rtn_refuses_an_empty_weight(shape):
    """K = 0 per channel used to divide by zero (K // K)."""
    with pytest.raises(ValueError, match="weight must have K >= 1"):
        quantize_rtn(jnp.ones(shape), bits=4, group_size=-1)
