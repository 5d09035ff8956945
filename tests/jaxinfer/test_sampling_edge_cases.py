"""Edge cases of the sampling filters: ties at the top-k cutoff, a top_p that is 0 in float32, and
a top_k beyond int32.

Oracle: transformers' TopKLogitsWarper and TopPLogitsWarper. Where a tie straddles the top-p
cutoff, transformers keeps part of it (by sort position) and `filter_logits` keeps it whole (its
documented rule), so those cases assert that rule against transformers' kept set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from jaxinfer.generate import sampling
from jaxinfer.generate.sampling import INT32_MAX, SamplingArrays, make_sampling_params

filter_logits = jax.jit(sampling.filter_logits)
sample_next_token = jax.jit(sampling.sample_next_token)

PROB_ATOL = 1e-6  # float32 softmax of the same float32 logits in torch and XLA

# a 5-way tie at the 3rd largest logit: top_k=3 keeps 7 tokens
TIED_AT_K = np.array([3.0, 2.9, 1.0, 1.0, 1.0, 1.0, 1.0, -2.0], np.float32)


def hf_probs(logits: np.ndarray, top_k: int | None, top_p: float) -> np.ndarray:
    """transformers' top-k then top-p over one row of logits -> probabilities."""
    scores = torch.tensor(logits[None])
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1)[0].numpy()


def jx_probs(logits: np.ndarray, top_k: int | None, top_p: float) -> np.ndarray:
    params = SamplingArrays(jnp.float32(1.0), jnp.int32(top_k or 0), jnp.float32(top_p))
    return np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits[None]), params), -1))[0]


def softmax_over(logits: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The distribution that keeps exactly `kept` (float64)."""
    x = np.where(kept, logits.astype(np.float64), -np.inf)
    p = np.exp(x - x.max())
    return p / p.sum()


def test_top_p_counts_every_token_tied_at_the_top_k_cutoff_like_transformers():
    """The nucleus mass is measured over all 7 tokens top-k keeps, not over the first k: with
    the mass of all of them the second token is needed (transformers keeps 2), with only 3 it
    would not be (the top token alone would hold 0.49 >= 0.45)."""
    hf, got = hf_probs(TIED_AT_K, 3, 0.45), jx_probs(TIED_AT_K, 3, 0.45)
    np.testing.assert_array_equal(got > 0, [True, True, False, False, False, False, False, False])
    np.testing.assert_allclose(got, hf, atol=PROB_ATOL)


def test_top_p_keeps_a_tie_at_its_cutoff_whole_where_transformers_keeps_part_of_it():
    """top_k=3, top_p=0.9: the prefix needs 4 of the 5 tied tokens; transformers keeps those 4
    (by sort position), `filter_logits` all 5 (by value); otherwise they keep the same tokens."""
    hf, got = hf_probs(TIED_AT_K, 3, 0.9), jx_probs(TIED_AT_K, 3, 0.9)
    hf_kept = hf > 0
    assert hf_kept.sum() == 6  # the two top tokens and 4 of the 5 tied ones
    cutoff = TIED_AT_K[hf_kept].min()
    want_kept = hf_kept | (TIED_AT_K == cutoff)  # what transformers keeps, its cut tie made whole
    np.testing.assert_array_equal(got > 0, want_kept)
    np.testing.assert_allclose(got, softmax_over(TIED_AT_K, want_kept), atol=PROB_ATOL)


@pytest.mark.parametrize("top_p", [1e-46, 1e-300])
def test_a_top_p_that_is_zero_in_float32_keeps_the_most_probable_token(top_p):
    logits = np.array([0.5, 2.0, 1.0, -1.0], np.float32)
    assert np.float32(top_p) == 0.0
    got = jx_probs(logits, None, top_p)
    np.testing.assert_allclose(got, hf_probs(logits, None, top_p), atol=PROB_ATOL)
    np.testing.assert_array_equal(got, [0.0, 1.0, 0.0, 0.0])
    params = SamplingArrays(jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.int32),
                            jnp.full(4, top_p, jnp.float32))
    keys = jax.random.split(jax.random.key(0), 4)
    tokens = sample_next_token(jnp.asarray(np.tile(logits, (4, 1))), params, keys)
    np.testing.assert_array_equal(np.asarray(tokens), [1, 1, 1, 1])


@pytest.mark.parametrize("top_k", [2**31, 10**12])
def test_a_top_k_beyond_int32_means_no_top_k_filter(top_k):
    params = make_sampling_params(1.0, top_k, None)
    assert int(params.top_k) == INT32_MAX
    logits = np.random.default_rng(0).normal(0.0, 3.0, (2, 50)).astype(np.float32)
    unfiltered = make_sampling_params(1.0, None, None)
    np.testing.assert_array_equal(np.asarray(filter_logits(jnp.asarray(logits), params)),
                                  np.asarray(filter_logits(jnp.asarray(logits), unfiltered)))


def test_legacy_raw_keys_draw_as_their_typed_keys():
    # jax.random.PRNGKey's uint32 [2] (or [batch, 2]) is wrapped, not taken for a [2] key array
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16)), jnp.float32)
    params = make_sampling_params(1.0, None, None)
    typed = sampling.sample_next_token(logits, params, jax.random.key(7))
    raw = sampling.sample_next_token(logits, params, jax.random.PRNGKey(7))
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(typed))
    keys = jax.random.split(jax.random.key(8), 3)
    per_row = sampling.sample_next_token(logits, params, jax.random.key_data(keys))
    np.testing.assert_array_equal(np.asarray(per_row),
                                  np.asarray(sampling.sample_next_token(logits, params, keys)))
