"""Mixed 2/4-bit quantization: group choice, layout, average bits, and GPTQ beating RTN."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.quant import (MixedQuantizedWeight, gptq_quantize_layer, hessian_from_activations,
                            quantize_rtn, select_high_groups)
from jaxinfer.quant.mixed import high_group_count
from tests.jaxinfer.quant.test_gptq import _correlated_inputs, _recon_error, _weight

G = 16  # 8 groups of K=128 rows for the selection tests
# test_gptq's weight [128, 32] in groups of 32 (4 groups, one kept at 4 bits): the quantizers
# compile once for that shape and group size in the whole test session.
LAYER_G = 32


def _spiky_weight(big_groups, k=128, n=8, group_size=G):
    """Small random weights with a large range in the groups ``big_groups``."""
    w = np.random.default_rng(0).uniform(-1, 1, (k, n))
    for g in big_groups:
        w[g * group_size:(g + 1) * group_size] *= 10
    return jnp.asarray(w, jnp.float32)


def test_range_criterion_picks_the_groups_with_the_largest_range():
    high = select_high_groups(_spiky_weight([2, 5]), 0.25, G)
    np.testing.assert_array_equal(np.flatnonzero(high), [2, 5])


def test_hessian_criterion_picks_the_groups_with_the_largest_weighted_error():
    w = _spiky_weight([2, 5])  # largest range, but inputs 16..31 and 96..111 matter 1000x more
    h_diag = np.ones(128)
    h_diag[16:32] = h_diag[96:112] = 1e3
    high = select_high_groups(w, 0.25, G, criterion="hessian", hessian=jnp.diag(h_diag))
    np.testing.assert_array_equal(np.flatnonzero(high), [1, 6])


@pytest.mark.parametrize("groups, group_size, fraction, expect", [
    (8, 16, 0.25, 2), (8, 16, 0.0, 0), (8, 16, 1.0, 8), (8, 16, 0.3, 2),
    (8, 8, 0.2, 2),  # G=8: the 4-bit rows must be a multiple of 16, so groups come in pairs
    (16, 4, 0.1, 0),  # G=4: steps of 4 groups; 1.6 groups rounds down to none
    (2, 32, 0.25, 1),  # half a group rounds up
])
def test_high_group_count_rounds_to_whole_packed_words(groups, group_size, fraction, expect):
    assert high_group_count(groups, group_size, fraction) == expect


def test_mixed_rtn_groups_equal_uniform_rtn_at_their_width_and_report_average_bits():
    w, g = _weight(), LAYER_G
    mixed = quantize_rtn(w, bits=(2, 4), group_size=g, high_fraction=0.25)
    assert isinstance(mixed, MixedQuantizedWeight) and mixed.high_fraction == 0.25
    assert mixed.bits_per_weight == 0.25 * (4 + 20 / g) + 0.75 * (2 + 18 / g)
    high_rows = np.repeat(select_high_groups(w, 0.25, g), g)  # [K]
    got = np.asarray(mixed.dequantize())
    np.testing.assert_array_equal(
        got[high_rows], np.asarray(quantize_rtn(w, bits=4, group_size=g).dequantize())[high_rows])
    np.testing.assert_array_equal(
        got[~high_rows], np.asarray(quantize_rtn(w, bits=2, group_size=g).dequantize())[~high_rows])


def test_mixed_gptq_beats_mixed_rtn_and_lies_between_2_and_4_bits():
    x, w = _correlated_inputs(), _weight()
    h = hessian_from_activations(x)
    kw = dict(group_size=LAYER_G, act_order=True)  # groups are runs of act order
    mixed = gptq_quantize_layer(w, h, bits=(2, 4), high_fraction=0.25, criterion="hessian", **kw)
    rtn = quantize_rtn(w, bits=(2, 4), group_size=LAYER_G, high_fraction=0.25,
                       criterion="hessian", hessian=h)
    errors = {name: _recon_error(x, w, qw) for name, qw in [
        ("mixed", mixed), ("rtn", rtn), ("2", gptq_quantize_layer(w, h, bits=2, **kw)),
        ("4", gptq_quantize_layer(w, h, bits=4, **kw))]}
    # Measured: GPTQ/RTN ~0.80-0.84; mixed sits at ~0.83-0.87 of 2-bit, ~4.3x 4-bit.
    assert errors["mixed"] < 0.95 * errors["rtn"], errors
    assert errors["4"] < errors["mixed"] < errors["2"], errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=(2, 4), high_fraction=-0.1), r"high_fraction must be a number in \[0, 1\]"),
    (dict(bits=(2, 4), high_fraction=1.5), r"high_fraction must be a number in \[0, 1\]"),
    (dict(bits=(3, 4)), r"mixed bits must be \(low, high\) = \(2, 4\)"),
    (dict(bits=(2, 8)), r"mixed bits must be \(low, high\) = \(2, 4\)"),
    (dict(bits=(2, 4), group_size=-1), "group_size must be a positive int, got -1"),
    (dict(bits=(2, 4), criterion="size"), "criterion must be one of"),
    (dict(bits=(2, 4), criterion="hessian"), "criterion='hessian' needs the layer hessian"),
    (dict(bits=4, high_fraction=0.5), "apply only to mixed bits"),
    (dict(bits=(2, 4), group_size=8), "multiple of 16 for 2-bit packing"),
])
def test_rtn_rejects_bad_mixed_arguments(kwargs, message):
    k = 24 if kwargs.get("group_size") == 8 else 128
    with pytest.raises(ValueError, match=message):
        quantize_rtn(jnp.ones((k, 8)), **{"group_size": G, **kwargs})


def test_gptq_rejects_bad_mixed_arguments():
    w = jnp.ones((128, 8))
    with pytest.raises(ValueError, match=r"high_fraction must be a number in \[0, 1\]"):
        gptq_quantize_layer(w, jnp.eye(128), bits=(2, 4), group_size=G, high_fraction=2)
    with pytest.raises(ValueError, match=r"mixed bits must be \(low, high\)"):
        gptq_quantize_layer(w, jnp.eye(128), bits=(4, 2), group_size=G)
