"""merge_attention: attention over two disjoint key sets, merged, equals attention over all keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_attention, merge_attention
from tests.kernels_pallas.attention_cases import F32_TOL, LSE_ATOL, rel_err

T, S, HQ, HKV, D = 9, 26, 4, 2, 16
SPLIT = 11  # the first part holds keys [0, SPLIT), the second [SPLIT, S)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, T, HQ, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, S, HKV, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, S, HKV, D)), jnp.float32)
    q_ids = jnp.asarray(rng.integers(0, 3, (2, T)), jnp.int32)
    # Key ids 0 and 1 fall only in the first part, id 2 only in the second: some rows see keys in
    # one part alone (the other part's lse is -inf), rows with id 2 see only the second.
    kv_ids = jnp.asarray(np.concatenate([rng.integers(0, 2, (2, SPLIT)),
                                         np.full((2, S - SPLIT), 2)], axis=1), jnp.int32)
    return q, k, v, q_ids, kv_ids


def _split_and_merge(q, k, v, q_ids, kv_ids, backend):
    parts = []
    for sl in (slice(0, SPLIT), slice(SPLIT, S)):
        parts += flash_attention(q, k[:, sl], v[:, sl], segment_ids=(q_ids, kv_ids[:, sl]),
                                 return_lse=True, backend=backend, block_q=16, block_k=16)
    return merge_attention(*parts)


# The kernels' lse and its gradient are checked against the reference in test_flash_attention;
# here the merge itself is under test, on the oracle and on the XLA path (pallas would only repeat).
@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_merge_of_two_key_halves_equals_whole_forward_and_grads(backend):
    q, k, v, q_ids, kv_ids = _inputs()
    ct = jnp.asarray(np.random.default_rng(3).standard_normal((2, T, HQ, D)), jnp.float32)
    ct_lse = jnp.asarray(np.random.default_rng(4).standard_normal((2, T, HQ)), jnp.float32)

    def loss(fn):
        def f(q, k, v):
            out, lse = fn(q, k, v)
            finite_lse = jnp.where(jnp.isfinite(lse), lse, 0)
            return jnp.sum(out * ct) + jnp.sum(finite_lse * ct_lse), (out, lse)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))

    merged = loss(lambda q, k, v: _split_and_merge(q, k, v, q_ids, kv_ids, backend))(q, k, v)
    whole = loss(lambda q, k, v: flash_attention(q, k, v, segment_ids=(q_ids, kv_ids),
                                                 return_lse=True, backend="reference"))(q, k, v)
    (grads, (out, lse)), (ref_grads, (ref_out, ref_lse)) = merged, whole
    assert rel_err(out, ref_out) < F32_TOL
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=LSE_ATOL)
    for g, ref_g in zip(grads, ref_grads):
        assert np.all(np.isfinite(np.asarray(g)))
        assert rel_err(g, ref_g) < F32_TOL


def test_merge_of_two_empty_parts_is_zero_with_neg_inf_lse():
    o = jnp.ones((1, 2, 1, 4), jnp.bfloat16)
    lse = jnp.full((1, 2, 1), -jnp.inf)
    out, out_lse = jax.jit(merge_attention)(o, lse, o, lse)
    assert out.dtype == jnp.bfloat16 and out_lse.dtype == jnp.float32
    assert np.all(np.asarray(out, np.float32) == 0) and np.all(np.asarray(out_lse) == -np.inf)
    grads = jax.jit(jax.grad(lambda a, b: jnp.sum(merge_attention(o, a, o, b)[0]),
                             argnums=(0, 1)))(lse, lse)
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_merge_is_symmetric_and_weights_by_exp_lse():
    o1 = jnp.full((1, 1, 1, 2), 1.0)
    o2 = jnp.full((1, 1, 1, 2), 4.0)
    lse1 = jnp.log(jnp.full((1, 1, 1), 3.0))  # part 1 holds 3/4 of the probability mass
    lse2 = jnp.log(jnp.full((1, 1, 1), 1.0))
    merge = jax.jit(merge_attention)
    out, lse = merge(o1, lse1, o2, lse2)
    np.testing.assert_allclose(out, 0.75 * 1.0 + 0.25 * 4.0, rtol=1e-6)
    np.testing.assert_allclose(lse, np.log(4.0), rtol=1e-6)
    out_swapped, _ = merge(o2, lse2, o1, lse1)
    np.testing.assert_allclose(out_swapped, out, rtol=1e-6)


_O = jnp.ones((1, 2, 1, 4), jnp.float32)
_LSE = jnp.zeros((1, 2, 1), jnp.float32)


@pytest.mark.parametrize("args,match", [
    # an lse of the wrong rank used to broadcast into a [1, 2, 2, 4] result
    ((_O, _LSE, _O, jnp.zeros((1, 2))),
     r"lse2 must have shape o1.shape\[:-1\] = \[1, 2, 1\]; got lse2 \[1, 2\]"),
    ((_O, jnp.zeros((1, 2, 4)), _O, _LSE), r"lse1 must have shape .* got lse1 \[1, 2, 4\]"),
    ((_O, _LSE, jnp.ones((1, 2, 2, 4)), _LSE),
     r"o1 and o2 must have the same shape \[..., D\]; got o1 \[1, 2, 1, 4\] and o2 \[1, 2, 2, 4\]"),
    ((_O.astype(jnp.int32), _LSE, _O, _LSE), r"o1 must have a floating dtype; got int32"),
    ((_O, _LSE, _O, _LSE.astype(jnp.int32)), r"lse2 must have a floating dtype; got int32"),
])
def test_merge_rejects_mismatched_shapes_and_non_float_dtypes(args, match):
    with pytest.raises(ValueError, match=match):
        merge_attention(*args)


def test_merge_rejects_non_arrays_and_accepts_mixed_float_dtypes_of_any_rank():
    with pytest.raises(TypeError, match=r"lse1 must be an array; got list"):
        merge_attention(_O, [0.0], _O, _LSE)
    # decode's [batch, H, D] parts, a float32 accumulator merged with a bfloat16 part
    out, lse = merge_attention(_O[0], _LSE[0], _O[0].astype(jnp.bfloat16), _LSE[0])
    assert out.shape == (2, 1, 4) and out.dtype == jnp.float32 and lse.shape == (2, 1)


def test_mixed_dtypes_merge_to_the_promoted_dtype_in_either_order():
    """A bfloat16 part merged with a float32 one keeps float32 whichever comes first, and the
    merge is symmetric bit for bit (it must not round to the first argument's dtype)."""
    o32 = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 4)), jnp.float32)
    o16 = o32[::-1].astype(jnp.bfloat16)
    lse1, lse2 = jnp.full((2, 3), 0.3), jnp.full((2, 3), -0.2)
    a, lse_a = merge_attention(o16, lse1, o32, lse2)
    b, lse_b = merge_attention(o32, lse2, o16, lse1)
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(lse_a), np.asarray(lse_b))
