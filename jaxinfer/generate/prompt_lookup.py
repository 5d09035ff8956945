"""Prompt-lookup drafts (Aggressive Decoding's input-guided drafting), host and traced.

The draft is what followed the latest earlier occurrence of the sequence's last `ngram` tokens:
outputs that copy from the prompt (summaries, edits, code, retrieval answers) are proposed whole.
A draft is a guess that costs compute when wrong, never a change of output: the engine verifies
drafts by sampling the target at every drafted position with the keys it would use anyway
(`engine_step`), and `speculative_generate` by its lossless acceptance rule.

Two forms of the one algorithm, which differ where the caller's shapes force them to:

* `lookup_draft` (numpy, on the host; the Engine): a list of *up to* max_tokens tokens, the ones
  after the match up to the sequence's end, and [] when nothing matches: no draft, no wasted work.
* `lookup_draft_traced` (jnp, inside `speculative_generate`'s jitted loop): always gamma tokens,
  a fixed shape. The continuation is read periodically when it runs into the present, and
  without a match the draft repeats the last token; acceptance decides whether that is any good.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def lookup_draft(tokens: list[int], ngram: int, max_tokens: int) -> list[int]:
    """Up to max_tokens tokens that followed the latest earlier match of tokens[-ngram:] (the
    match must end before the last token); [] when there is none."""
    if max_tokens < 1 or len(tokens) <= ngram:
        return []
    ids = np.asarray(tokens)
    windows = sliding_window_view(ids[:-1], ngram)  # [len - ngram, ngram]: earlier n-grams
    hits = np.flatnonzero(np.all(windows == ids[-ngram:], axis=1))
    if hits.size == 0:
        return []
    start = int(hits[-1]) + ngram
    return ids[start:start + max_tokens].tolist()


def lookup_draft_traced(tokens: jax.Array, length: jax.Array, ngram: int, gamma: int
                        ) -> jax.Array:
    """The gamma tokens that followed the latest earlier occurrence of the last `ngram` tokens
    of tokens[:length], traceable (ngram and gamma static).

    tokens int32 [buffer]; returns int32 [gamma]. A match at i (i + ngram <= length - 1) implies a
    period p = length - ngram - i, and the continuation is read periodically (tokens[length - p +
    (k mod p)]) so drafts never read past `length`. Without a match the draft repeats the last
    token (p = 1)."""
    buffer = tokens.shape[0]
    starts = jnp.arange(buffer - ngram + 1)  # candidate match starts
    last = jax.lax.dynamic_slice(tokens, (jnp.maximum(length - ngram, 0),), (ngram,))  # [ngram]
    windows = tokens[starts[:, None] + jnp.arange(ngram)]  # [candidates, ngram]
    valid = (starts + ngram <= length - 1) & (length >= ngram)
    hit = jnp.all(windows == last, axis=-1) & valid
    latest = jnp.max(jnp.where(hit, starts, -1))
    period = jnp.where(latest >= 0, length - ngram - latest, 1)
    return tokens[length - period + jnp.arange(gamma) % period]
