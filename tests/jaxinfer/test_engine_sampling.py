"""The per-row sampling the engine relies on: per-row settings, min-p, repetition penalty, keys.

Oracles: the scalar-parameter `filter_logits` (checked against a numpy transcription of HF's rule
in test_generate.py) applied one row at a time, and numpy transcriptions of the min-p and
repetition-penalty rules written here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.generate import sampling
from jaxinfer.generate.sampling import SamplingArrays, apply_repetition_penalty

# jitted once per shape: op-by-op dispatch of the sort/cond-heavy filters is slow on a busy CPU
filter_logits = jax.jit(sampling.filter_logits)
sample_next_token = jax.jit(sampling.sample_next_token)

FILTER_ATOL = 1e-5  # float32 softmax and division against float64 numpy

ROWS = SamplingArrays(  # four rows, four different settings
    temperature=jnp.array([1.0, 0.7, 2.0, 0.5], jnp.float32),
    top_k=jnp.array([0, 5, 0, 3], jnp.int32),
    top_p=jnp.array([1.0, 1.0, 0.8, 0.9], jnp.float32),
    min_p=jnp.array([0.0, 0.0, 0.0, 0.1], jnp.float32),
    repetition_penalty=jnp.array([1.0, 1.0, 1.0, 1.0], jnp.float32))


def logits_rows(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 3.0, (4, 40)).astype(np.float32)


def test_per_row_settings_equal_the_same_settings_applied_row_by_row():
    logits = jnp.asarray(logits_rows(0))
    got = np.asarray(filter_logits(logits, ROWS))
    for i in range(4):
        row = SamplingArrays(*(jnp.asarray(field)[i] for field in ROWS))
        want = np.asarray(filter_logits(logits[i:i + 1], row))[0]
        np.testing.assert_array_equal(np.isneginf(got[i]), np.isneginf(want))
        np.testing.assert_allclose(got[i][~np.isneginf(want)], want[~np.isneginf(want)],
                                   rtol=FILTER_ATOL, atol=FILTER_ATOL)


def test_min_p_keeps_exactly_the_tokens_at_least_min_p_times_as_likely_as_the_best():
    logits = logits_rows(1)
    params = SamplingArrays(jnp.float32(0.8), jnp.int32(0), jnp.float32(1.0), jnp.float32(0.05))
    got = np.asarray(filter_logits(jnp.asarray(logits), params))
    scaled = logits.astype(np.float64) / 0.8
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want_kept = probs >= 0.05 * probs.max(-1, keepdims=True)
    np.testing.assert_array_equal(~np.isneginf(got), want_kept)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = np.array([[2.0, -2.0, 1.0, -1.0]], np.float32)
    seen = np.array([[True, True, False, False]])
    got = np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 2.0))
    np.testing.assert_allclose(got, [[1.0, -4.0, 1.0, -1.0]])


def test_per_row_keys_make_each_row_independent_of_the_others():
    logits = jnp.asarray(logits_rows(2))
    params = SamplingArrays(jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.int32),
                            jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.float32),
                            jnp.ones(4, jnp.float32))
    keys = jax.random.split(jax.random.key(0), 4)
    together = np.asarray(sample_next_token(logits, params, keys))
    for i in range(4):
        row = SamplingArrays(*(field[i:i + 1] for field in params))
        alone = np.asarray(sample_next_token(logits[i:i + 1], row, keys[i:i + 1]))
        assert alone[0] == together[i]


def test_greedy_rows_take_the_argmax_in_a_batch_that_samples():
    logits = jnp.asarray(logits_rows(3))
    params = SamplingArrays(jnp.array([0.0, 1.0, 0.0, 1.0], jnp.float32), jnp.zeros(4, jnp.int32),
                            jnp.ones(4, jnp.float32))
    tokens = np.asarray(sample_next_token(logits, params, jax.random.split(jax.random.key(1), 4)))
    argmax = np.asarray(logits).argmax(-1)
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]
