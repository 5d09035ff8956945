"""flash_attention rejects bad input at the API, naming the argument, the expectation, the value."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_attention, tile_fraction
from kernels_pallas.attention import BlockSizes
from tests.kernels_pallas.attention_cases import F32_TOL

Q = jnp.zeros((2, 8, 4, 16), jnp.float32)
KV = jnp.zeros((2, 8, 2, 16), jnp.float32)


@pytest.mark.parametrize("q,k,v,match", [
    (jnp.zeros((8, 4, 16)), KV, KV, r"q must have rank 4 \[batch, T, Hq, D\]; got q \[8, 4, 16\]"),
    (Q, jnp.zeros((2, 8, 16)), jnp.zeros((2, 8, 16)), r"k must have rank 4"),
    (Q, KV, jnp.zeros((2, 8, 1, 16)), r"k and v must have the same shape; got k \[2, 8, 2, 16\] "
                                      r"and v \[2, 8, 1, 16\]"),
    (Q, jnp.zeros((2, 8, 3, 16)), jnp.zeros((2, 8, 3, 16)), r"Hq % Hkv == 0\); got Hq=4, Hkv=3"),
    (Q, jnp.zeros((2, 4, 2, 16)), jnp.zeros((2, 4, 2, 16)), r"T <= S.*got T=8, S=4"),
    (Q, jnp.zeros((3, 8, 2, 16)), jnp.zeros((3, 8, 2, 16)), r"same batch size"),
    (Q, jnp.zeros((2, 8, 2, 8)), jnp.zeros((2, 8, 2, 8)), r"same head dim D"),
    (Q.astype(jnp.int32), KV.astype(jnp.int32), KV.astype(jnp.int32),
     r"must be float32, bfloat16 or float16; got int32"),
    (Q, KV.astype(jnp.bfloat16), KV.astype(jnp.bfloat16),
     r"must share a dtype; got float32, bfloat16"),
])
def test_bad_shapes_and_dtypes_raise_value_error(q, k, v, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v)


@pytest.mark.parametrize("kwargs,match", [
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)),
     r"segment_ids must have shape \[batch, S\] = \[2, 8\]; got \[2, 7\]"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.float32)), r"segment_ids must have an integer dtype"),
    (dict(segment_ids=(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 8), jnp.int32))),
     r"segment_ids\[0\] \(q_ids\) must have shape \[batch, T\] = \[2, 8\]; got \[2, 5\]"),
    (dict(segment_ids=(jnp.zeros((2, 8), jnp.int32),)), r"or a pair .* got a sequence of 1"),
    (dict(local_window=(3, -1)), r"local_window must be .* pair \(left, right\) .* got \(3, -1\)"),
    (dict(local_window=(1, 2, 3)), r"local_window must be"),
    (dict(local_window=2.5), r"local_window must be"),
    (dict(logit_softcap=0.0),
     r"logit_softcap must be None or a finite Python number > 0; got 0.0"),
    (dict(logit_softcap=float("inf")), r"logit_softcap must be None or a finite"),
    (dict(softmax_scale=0), r"softmax_scale must be None or a finite, nonzero"),
    (dict(softmax_scale=float("nan")), r"softmax_scale must be None or a finite, nonzero"),
    (dict(backend="cuda"), r"backend must be one of .*; got 'cuda'"),
    (dict(backend="pallas", block_q=24), r"block_q must be a power of two >= 16 .*; got 24"),
    (dict(backend="pallas", block_k=8), r"block_k must be a power of two >= 16 .*; got 8"),
    (dict(backend="xla", block_k=0), r"block_k must be None or a positive int; got 0"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(Q, KV, KV, **kwargs)


def test_non_bool_flags_and_non_arrays_raise_type_error():
    with pytest.raises(TypeError, match=r"causal must be a bool; got 1"):
        flash_attention(Q, KV, KV, causal=1)
    with pytest.raises(TypeError, match=r"k must be an array; got list"):
        flash_attention(Q, [1, 2], KV)


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_numpy_bool_flags_act_as_python_bools(backend):
    """causal and return_lse from numpy (a config loaded through numpy, np.bool_) are bools."""
    rng = np.random.default_rng(0)
    q, kv = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (Q, KV))
    expected = flash_attention(q, kv, kv, causal=True, return_lse=True, backend=backend)
    got = flash_attention(q, kv, kv, causal=np.bool_(True), return_lse=np.bool_(True),
                          backend=backend)
    for a, b in zip(got, expected):
        assert jnp.array_equal(a, b)
    assert tile_fraction(64, 64, causal=np.True_) == tile_fraction(64, 64, causal=True)


def test_single_segment_array_with_t_less_than_s_gives_queries_the_last_ids():
    q = jnp.ones((1, 3, 1, 16))
    kv = jnp.ones((1, 5, 1, 16))
    ids = jnp.asarray([[0, 0, 1, 1, 1]], jnp.int32)
    out_single = flash_attention(q, kv, kv, segment_ids=ids, backend="reference")
    out_pair = flash_attention(q, kv, kv, segment_ids=(ids[:, 2:], ids), backend="reference")
    assert jnp.array_equal(out_single, out_pair)


def test_int64_segment_ids_outside_int32_raise_instead_of_wrapping():
    """Ids 0 and 2**32 are two documents; cast to int32 they became one."""
    q = jnp.ones((1, 4, 1, 16))
    ids = np.array([[0, 0, 2 ** 32, 2 ** 32]], np.int64)
    match = r"segment_ids must hold int32 values .*; got int64 values in \[0, 4294967296\]"
    with pytest.raises(ValueError, match=match):
        flash_attention(q, q, q, segment_ids=ids, backend="xla")
    with pytest.raises(ValueError, match=r"segment_ids\[1\] \(kv_ids\) must hold int32 values"):
        flash_attention(q, q, q, segment_ids=(ids.clip(0, 1), ids), backend="xla")
    with pytest.raises(ValueError, match=match):
        tile_fraction(4, 4, segment_ids=ids)
    # int64 ids within int32's range are taken as they are
    small = np.array([[0, 0, 7, 7]], np.int64)
    assert jnp.array_equal(flash_attention(q, q, q, segment_ids=small, backend="reference"),
                           flash_attention(q, q, q, segment_ids=jnp.asarray(small, jnp.int32),
                                           backend="reference"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_q=12), r"block_q must be a multiple of 8 for the TPU backend .*; got 12"),
    (dict(block_k=4), r"block_k must be a multiple of 8 for the TPU backend .*; got 4"),
    (dict(block_sizes=BlockSizes(block_q=16, block_k=20, block_q_bwd=3, block_k_bwd=3)),
     r"block_sizes.block_k must be a multiple of 8 for the TPU backend .*; got 20"),
])
def test_tpu_tiles_must_be_multiples_of_8_not_triton_powers_of_two(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(Q, KV, KV, backend="pallas_tpu", **kwargs)


def test_tpu_kernel_takes_tiles_that_are_multiples_of_8_but_not_powers_of_two():
    """block_q=24 (refused once with a Triton message) runs on the TPU kernel, and matches the
    reference; the *_bwd tiles, which the TPU kernel ignores, need only be positive."""
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((1, 20, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 28, 1, 16)), jnp.float32) for _ in range(2))
    ref = flash_attention(q, k, v, causal=True, backend="reference")
    out = flash_attention(q, k, v, causal=True, backend="pallas_tpu", block_q=24, block_k=8)
    np.testing.assert_allclose(out, ref, atol=F32_TOL, rtol=F32_TOL)
    blocks = BlockSizes(block_q=8, block_k=24, block_q_bwd=3, block_k_bwd=3)
    out = flash_attention(q, k, v, causal=True, backend="pallas_tpu", block_sizes=blocks)
    np.testing.assert_allclose(out, ref, atol=F32_TOL, rtol=F32_TOL)
