"""The argument checks every op shares (kernels_pallas/validation.py): one mistake raises the same
exception type, with the same words, whichever op it is made in."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import (fftconv, flash_attention, paged_decode_attention, quant_matmul,
                            ragged_paged_attention)
from kernels_pallas.validation import check_block, is_int
from tests.kernels_pallas.quant_weights import random_weight


def _int_qkv():
    return [jnp.zeros((1, 16, 2, 16), jnp.int32)] * 3


def _paged(q):
    pages = jnp.zeros((4, 8, 2, 16), jnp.int32)
    return paged_decode_attention(q, pages, pages, jnp.zeros((1, 2), jnp.int32),
                                  jnp.ones((1,), jnp.int32))


def _ragged(q):
    pages = jnp.zeros((4, 8, 2, 16), jnp.int32)
    return ragged_paged_attention(q, pages, pages, jnp.zeros((1, 2), jnp.int32),
                                  jnp.array([0, 1], jnp.int32), jnp.ones((1,), jnp.int32))


WRONG_DTYPE_CALLS = {
    "flash_attention": lambda: flash_attention(*_int_qkv()),
    "paged_decode_attention": lambda: _paged(jnp.zeros((1, 2, 16), jnp.int32)),
    "ragged_paged_attention": lambda: _ragged(jnp.zeros((1, 2, 16), jnp.int32)),
    "fftconv": lambda: fftconv(jnp.zeros((1, 2, 32), jnp.int32), jnp.zeros((2, 4))),
    "quant_matmul": lambda: quant_matmul(jnp.ones((2, 128), jnp.int32),
                                         random_weight(128, 32, 4, 32)[0]),
}


@pytest.mark.parametrize("op", sorted(WRONG_DTYPE_CALLS))
def test_a_wrong_dtype_raises_value_error_in_every_op(op):
    with pytest.raises(ValueError, match=r"must be float32, bfloat16 or float16; got int32"):
        WRONG_DTYPE_CALLS[op]()


NOT_AN_ARRAY_CALLS = {
    "flash_attention": lambda: flash_attention([[0.0]], *_int_qkv()[1:]),
    "paged_decode_attention": lambda: _paged([[0.0]]),
    "ragged_paged_attention": lambda: _ragged([[0.0]]),
    "fftconv": lambda: fftconv([[[0.0]]], jnp.zeros((1, 1))),
    "quant_matmul": lambda: quant_matmul([[1.0] * 128], random_weight(128, 32, 4, 32)[0]),
}


@pytest.mark.parametrize("op", sorted(NOT_AN_ARRAY_CALLS))
def test_a_list_in_place_of_an_array_raises_type_error_in_every_op(op):
    with pytest.raises(TypeError, match=r"must be an array; got list"):
        NOT_AN_ARRAY_CALLS[op]()


@pytest.mark.parametrize("value", [None, 1, 16, np.int64(64)])
def test_check_block_takes_none_and_positive_ints_as_python_ints(value):
    got = check_block("block_q", value)
    assert got == value and (got is None or type(got) is int)


@pytest.mark.parametrize("value", [0, -16, True, 16.0, "16"])
def test_check_block_refuses_what_is_not_a_positive_int(value):
    with pytest.raises(ValueError, match=rf"block_q must be None or a positive int; got {value!r}"):
        check_block("block_q", value)


@pytest.mark.parametrize("value", [8, 24])
def test_check_block_holds_triton_tiles_to_powers_of_two_from_the_minimum(value):
    assert check_block("block_q", value, pallas=False) == value
    with pytest.raises(ValueError, match=rf"block_q must be a power of two >= 16 .*; got {value}"):
        check_block("block_q", value, pallas=True, minimum=16)


def test_is_int_counts_numpy_ints_but_not_bools():
    assert is_int(3) and is_int(np.int32(3))
    assert not any(is_int(x) for x in (True, np.bool_(True), 3.0))


@pytest.mark.parametrize("value", [8, 24, 40])
def test_check_block_holds_tpu_tiles_to_multiples_of_8_not_powers_of_two(value):
    assert check_block("block_q", value, tpu=True) == value
    with pytest.raises(ValueError, match=rf"block_q must be a multiple of 8 .*; got {value + 4}"):
        check_block("block_q", value + 4, tpu=True)
