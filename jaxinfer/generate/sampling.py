"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling.

Parameters are traced arrays, not Python constants, so one compiled decode loop serves every
setting. Filters apply in Hugging Face's order: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


class SamplingArrays(NamedTuple):
    temperature: jax.Array  # float32 scalar; 0 means greedy
    top_k: jax.Array  # int32 scalar; 0 means no top-k filter
    top_p: jax.Array  # float32 scalar; 1 means no nucleus filter


def make_sampling_params(temperature: float, top_k: int | None, top_p: float | None) -> SamplingArrays:
    """Validate user-facing sampling arguments and turn them into arrays."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0; got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1; got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1]; got {top_p!r}")
    return SamplingArrays(jnp.float32(temperature), jnp.int32(top_k or 0),
                          jnp.float32(1.0 if top_p is None else top_p))


def filter_logits(logits: jax.Array, params: SamplingArrays) -> jax.Array:
    """Scale by temperature and mask tokens outside top-k / top-p with -inf. logits [batch, vocab]."""
    logits = logits / jnp.maximum(params.temperature, 1e-6)
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [batch, vocab]
    vocab = logits.shape[-1]
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
    kth = jnp.take(sorted_desc, k - 1, axis=-1)[:, None]  # [batch, 1]
    logits = jnp.where(logits < kth, NEG_INF, logits)
    sorted_desc = jnp.where(jnp.arange(vocab) < k, sorted_desc, NEG_INF)
    # nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p (at least one)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < params.top_p) | (params.top_p >= 1.0)  # f32 cumsum can round to 1
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)  # [batch, 1]
    return jnp.where(logits < cutoff, NEG_INF, logits)


def sample_next_token(logits: jax.Array, params: SamplingArrays, key: jax.Array) -> jax.Array:
    """One token id per row of logits [batch, vocab] -> int32 [batch].

    Branches (not masks) keep greedy decoding free of the vocabulary sort and the random draw."""
    def sample() -> jax.Array:
        filtered = jax.lax.cond(
            (params.top_k > 0) | (params.top_p < 1.0),
            lambda: filter_logits(logits, params),
            lambda: logits / jnp.maximum(params.temperature, 1e-6))
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    return jax.lax.cond(params.temperature > 0, sample,
                        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))
