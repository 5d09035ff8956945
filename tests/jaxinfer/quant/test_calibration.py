"""token_chunks: whole non-overlapping chunks from the head or the tail of a token stream."""

import numpy as np
import pytest

from jaxinfer.quant import token_chunks


def test_chunks_from_head_and_tail_are_consecutive_whole_windows():
    tokens = np.arange(23)
    np.testing.assert_array_equal(token_chunks(tokens, 5, 2), [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(token_chunks(tokens, 5, 2, from_end=True),
                                  [[13, 14, 15, 16, 17], [18, 19, 20, 21, 22]])
    assert token_chunks(tokens, 5).shape == (4, 5)  # None: every whole chunk
    assert token_chunks(tokens, 5, 100).shape == (4, 5)  # at most what the stream holds
    assert token_chunks(tokens, 5).dtype == np.int32
    # NumPy ints (a config read with numpy) as Python ints; they used to be refused
    np.testing.assert_array_equal(token_chunks(tokens, np.int64(5), np.int32(2)),
                                  token_chunks(tokens, 5, 2))


@pytest.mark.parametrize("args, match", [
    ((np.arange(4), 5), "fewer than one chunk of seq_len=5"),
    ((np.zeros((2, 8)), 4), "1-D stream"),
    ((np.arange(8), 0), "seq_len must be a positive int"),
    ((np.arange(8), 4, 0), "n_chunks must be a positive int or None"),
    # a float stream used to be truncated to ids ([1.9, 2.7] -> [1, 2])
    ((np.array([1.9, 2.7, 3.2, 4.99]), 2), "tokens must hold integer token ids; got dtype float64"),
    ((np.arange(8), True), "seq_len must be a positive int"),
    ((np.arange(8), 4, True), "n_chunks must be a positive int or None"),
])
def test_bad_arguments_raise_clear_errors(args, match):
    with pytest.raises(ValueError, match=match):
        token_chunks(*args)
