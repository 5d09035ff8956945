"""Next-token selection: greedy, temperature, top-k, top-p (nucleus), min-p and repetition penalty.

Parameters are traced arrays, not Python constants, so one compiled step serves every setting. Each
field is a scalar (one setting for the whole batch, as `generate` uses) or a [batch] array (one
setting per row, as the serving engine uses). Filters apply in Hugging Face's order: repetition
penalty, temperature, top-k, top-p, then min-p.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinfer.generate.checks import check_sampling

NEG_INF = -jnp.inf
INT32_MAX = 2**31 - 1


class SamplingArrays(NamedTuple):
    temperature: jax.Array  # float32 scalar or [batch]; 0 means greedy
    top_k: jax.Array  # int32 scalar or [batch]; 0 means no top-k filter
    top_p: jax.Array  # float32 scalar or [batch]; 1 means no nucleus filter
    min_p: jax.Array | float = 0.0  # float32 scalar or [batch]; 0 means no min-p filter
    repetition_penalty: jax.Array | float = 1.0  # float32 scalar or [batch]; 1 means none


def make_sampling_params(temperature: float, top_k: int | None,
                         top_p: float | None) -> SamplingArrays:
    """Validate user-facing sampling arguments (`checks.check_sampling`, the rules
    `SamplingParams` applies too) and turn them into arrays."""
    checked = check_sampling(temperature, top_k, top_p)
    return SamplingArrays(jnp.float32(checked["temperature"]),
                          jnp.int32(top_k_as_int32(checked["top_k"])),
                          jnp.float32(1.0 if checked["top_p"] is None else checked["top_p"]))


def top_k_as_int32(top_k: int | None) -> int:
    """A valid top_k (None or an int >= 1) as the value the int32 `SamplingArrays.top_k` holds:
    0 (no filter) for None, and at most INT32_MAX. A top_k at or above the vocabulary keeps every
    token (as in transformers and vLLM), so clamping changes nothing but lets any int through."""
    return 0 if top_k is None else min(top_k, INT32_MAX)


def _per_row(value, batch: int) -> jax.Array:
    """A scalar or [batch] parameter as a [batch, 1] column that broadcasts against the vocab."""
    return jnp.broadcast_to(jnp.asarray(value), (batch,))[:, None]


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """HF's rule on tokens already in the sequence: positive logits / penalty, negative * penalty.

    logits [batch, vocab]; seen bool [batch, vocab]; penalty scalar or [batch] (1 = no change)."""
    p = _per_row(penalty, logits.shape[0])
    penalized = jnp.where(logits > 0, logits / p, logits * p)
    return jnp.where(seen, penalized, logits)


def filter_logits(logits: jax.Array, params: SamplingArrays) -> jax.Array:
    """Scale by temperature and mask tokens outside top-k / top-p / min-p with -inf.

    Ties are decided by value, never by position in the sort, so the kept set does not depend on
    how the sort orders equal logits: top-k keeps every token tied with the k-th largest logit
    (as transformers does), and top-p, which measures its mass over what top-k kept, keeps every
    token tied with the last one its prefix needs. transformers cuts a tie at the top-p cutoff
    by sort position instead, keeping only part of it; the two agree wherever no tie straddles
    that cutoff. The most probable token always stays (transformers' min_tokens_to_keep=1), also
    for a top_p that rounds to 0 in float32.

    logits [batch, vocab] -> [batch, vocab]."""
    batch, vocab = logits.shape
    logits = logits / jnp.maximum(_per_row(params.temperature, batch), 1e-6)
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [batch, vocab]
    top_k = _per_row(params.top_k, batch)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)  # [batch, 1]
    kth = jnp.take_along_axis(sorted_desc, k - 1, axis=-1)  # [batch, 1]
    logits = jnp.where(logits < kth, NEG_INF, logits)
    sorted_desc = jnp.where(sorted_desc < kth, NEG_INF, sorted_desc)  # the same cut, by value
    # nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p, and the top one
    top_p = _per_row(params.top_p, batch)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    first = jnp.arange(vocab) == 0  # [vocab]: kept even when top_p is 0 in float32
    keep = (mass_before < top_p) | (top_p >= 1.0) | first  # f32 cumsum can round to 1
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)  # [batch, 1]
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
    # min-p: drop tokens less likely than min_p times the most likely one (the top token stays)
    min_p = _per_row(params.min_p, batch)
    floor = sorted_desc[:, :1] + jnp.log(jnp.maximum(min_p, 1e-30))  # [batch, 1] in logit space
    return jnp.where((min_p > 0) & (logits < floor), NEG_INF, logits)


def sample_next_token(logits: jax.Array, params: SamplingArrays, key: jax.Array,
                      seen: jax.Array | None = None) -> jax.Array:
    """One token id per row of logits [batch, vocab] -> int32 [batch].

    key: one PRNG key for the whole batch, or a [batch] array of keys (one stream per row, so that
    a row's draw does not depend on the other rows); typed keys (jax.random.key) or legacy raw
    ones (jax.random.PRNGKey, uint32 [2] or [batch, 2]). seen: bool [batch, vocab], the tokens each row
    has seen, needed only for a repetition penalty. Rows with temperature 0 take the argmax.
    Branches (not masks) keep all-greedy batches free of the vocabulary sort and the random draw."""
    batch = logits.shape[0]
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a legacy raw key: its last axis is the key data
    if seen is not None:
        logits = jax.lax.cond(jnp.any(jnp.asarray(params.repetition_penalty) != 1.0),
                              lambda: apply_repetition_penalty(logits, seen,
                                                               params.repetition_penalty),
                              lambda: logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = jnp.broadcast_to(jnp.asarray(params.temperature), (batch,))

    def sample() -> jax.Array:
        needs_filter = (jnp.any(jnp.asarray(params.top_k) > 0)
                        | jnp.any(jnp.asarray(params.top_p) < 1.0)
                        | jnp.any(jnp.asarray(params.min_p) > 0))
        filtered = jax.lax.cond(
            needs_filter, lambda: filter_logits(logits, params),
            lambda: logits / jnp.maximum(temperature[:, None], 1e-6))
        if key.shape == ():
            drawn = jax.random.categorical(key, filtered, axis=-1)
        else:
            drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, filtered)
        return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda: greedy)
